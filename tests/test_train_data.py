"""`kdk distill --data` formats, the held-out split, prompt/completion masking and bad files
(issue 12). Tiny models, a few steps each."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from kdkernels import reference
from kdkernels.data import documents
from kdkernels.data.documents import Document
from kdkernels.train import pipeline
from kdkernels.train.batches import streams
from kdkernels.train.objectives.dense import DistillObjective, teacher_outputs
from kdkernels.train.sources import split
from tests import _data_helpers as h


@pytest.fixture
def pair(tmp_path_factory):
    return h.qwen_pair(tmp_path_factory.mktemp("models"))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKERNELS_CACHE", str(tmp_path / "cache"))


def _run(tmp_path, pair, data, **kw):
    teacher, student = pair
    cfg = h.config(tmp_path, **kw)
    results = pipeline.run(cfg, teacher_path=str(teacher), student_path=str(student),
                           data=str(data))
    return results, (tmp_path / "run" / "report.md").read_text()


def _pc_records(n: int) -> list[dict]:
    return [{"prompt": f"question {i}: what does the student read?\n",
             "completion": h.prose(3, seed=i)} for i in range(n)]


def _text_records(n: int, field: str = "text") -> list[dict]:
    return [{field: h.prose(8, seed=i), "id": i} for i in range(n)]


def _make(kind: str, tmp_path):
    """--data of each format, with the extra config it needs."""
    if kind == "text file":
        p = tmp_path / "book.txt"
        p.write_text(h.prose(120))
        return p, {}
    if kind == "folder":
        d = tmp_path / "docs"
        (d / "sub").mkdir(parents=True)
        for i in range(12):
            (d / ("sub" if i % 2 else "") / f"f{i:02d}.md").write_text(h.prose(12, seed=i))
        return d, {}
    if kind == "jsonl text":
        return h.write_jsonl(tmp_path / "t.jsonl", _text_records(10)), {}
    if kind == "jsonl --text-field":
        return h.write_jsonl(tmp_path / "c.jsonl", _text_records(10, "content")), \
            {"text_field": "content"}
    if kind == "jsonl prompt/completion":
        return h.write_jsonl(tmp_path / "pc.jsonl", _pc_records(30)), {}
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(_text_records(10))
    if kind == "datasets folder":
        ds.save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved", {}
    assert kind == "parquet"
    ds.to_parquet(str(tmp_path / "t.parquet"))
    return tmp_path / "t.parquet", {}


FORMATS = ["text file", "folder", "jsonl text", "jsonl --text-field", "jsonl prompt/completion",
           "datasets folder", "parquet"]


@pytest.mark.parametrize("kind", FORMATS)
def test_each_data_format_trains(tmp_path, pair, kind):
    data, extra = _make(kind, tmp_path)
    results, report = _run(tmp_path, pair, data, **extra)
    assert results["kd"]["steps"] == 3 and results["kd"]["heldout_ce"] > 0
    # The report says how many documents and tokens each side holds, never zero.
    line = next(x for x in report.splitlines() if x.startswith("- corpus:"))
    sides = re.findall(r"(train|held-out) (\d+) documents, ([\d,]+) tokens", line)
    assert [s[0] for s in sides] == ["train", "held-out"], line
    assert all(int(n) >= 1 and int(t.replace(",", "")) > 0 for _, n, t in sides)
    if kind == "jsonl prompt/completion":
        assert "completion tokens trained on" in line


@pytest.mark.parametrize(("student_rows", "teacher_rows", "dtype"),
                         [(1000, 1024, "fp32"), (1024, 1000, "fp32"), (1016, 1024, "fp32"),
                          (1000, 1024, "bf16")])
def test_padded_vocabulary_pair_trains_and_its_loss_goes_down(tmp_path, student_rows,
                                                              teacher_rows, dtype):
    # The Qwen2.5 7B/0.5B situation: one tokenizer (1000 tokens here), a teacher head padded
    # beyond it, a tied-embedding student; also the student padded, and both.
    pair = h.qwen_pair(tmp_path, student_rows, teacher_rows)
    data = tmp_path / "book.txt"
    data.write_text(h.prose(200))
    results, report = _run(tmp_path, pair, data, max_steps=10, teacher_dtype=dtype)
    losses = [json.loads(x)["loss"] for x in
              (tmp_path / "run" / "kd" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3])
    assert "teacher_dtype = " + dtype in report


def _docs(n: int) -> list[Document]:
    return [Document(h.prose(4, seed=i), "", f"f{i}.txt") for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 12, 40])
def test_heldout_split_is_deterministic_and_never_empty(n):
    docs = _docs(n)
    train, held = split.split(docs, 0.1)
    assert (train, held) == split.split(list(docs), 0.1)
    assert len(held) == max(1, round(0.1 * n)) and len(train) == n - len(held)
    assert {d.where for d in train}.isdisjoint({d.where for d in held})
    assert sorted(d.where for d in train + held) == sorted(d.where for d in docs)
    # A larger fraction never leaves training empty.
    train, held = split.split(docs, 0.99)
    assert len(train) == 1 and len(held) == n - 1


def test_single_document_holds_out_its_last_part():
    text = h.prose(50)
    train, held = split.split([Document(text, "", "one.txt")], 0.1)
    assert train[0].text + held[0].text == text
    assert 0.05 * len(text) < len(held[0].text) < 0.2 * len(text)
    assert held[0].text.startswith(text.splitlines(True)[len(train[0].text.splitlines())])
    assert train[0].text.endswith("\n")  # cut at a line break
    # A prompt/completion record keeps its prompt for training; the held-out part reads
    # the prompt and the trained part as untrained context.
    (tr,), (he,) = split.split([Document("abcdefghij" * 5, "Q: ", "r")], 0.2)
    assert tr.prompt == "Q: " and he.prompt == "Q: " + tr.text and tr.text + he.text == \
        "abcdefghij" * 5
    with pytest.raises(ValueError, match="--heldout-fraction must be in"):
        split.split(_docs(3), 0.0)


def test_a_folder_of_12_files_and_a_single_file_split(tmp_path):
    # The two refusals of the issue: 12 files got 0 held out; one file was refused.
    data, _ = _make("folder", tmp_path)
    docs = documents.read(data)
    train, held = split.split(docs.docs, 0.1)
    assert len(docs.docs) == 12 and len(held) == 1 and len(train) == 11
    assert "sub/f01.md" in {d.where for d in docs.docs}
    single, _ = _make("text file", tmp_path)
    train, held = split.split(documents.read(single).docs, 0.1)
    assert len(train) == len(held) == 1


def test_prompt_completion_masking_is_exact():
    tok = h.tokenizer()
    docs = [Document("the answer\n", "the question? ", "a:1"),
            Document(" second reply", "prompt two ", "a:2")]
    stream = streams.encode(tok, docs, tok.eos_token_id)
    enc = tok.backend_tokenizer
    expect_ids, expect_targets = [], []
    for d in docs:
        p = enc.encode(d.prompt).ids
        c = enc.encode(d.text, add_special_tokens=False).ids
        expect_ids += p + c + [tok.eos_token_id]
        expect_targets += [False] * len(p) + [True] * (len(c) + 1)
    assert stream.ids.tolist() == expect_ids and stream.targets.tolist() == expect_targets
    # The labels of a window: the next token where it is a completion token, else -100.
    n = stream.numel()
    labels = streams.labels_of(stream, [0], n)[0]
    want = [expect_ids[j] if expect_targets[j] else -100 for j in range(1, n)]
    assert labels.tolist() == want
    # Those labels reach the loss as ignore_index: the objective equals the float64 oracle
    # on materialised logits with the same labels, and counts only completion tokens.
    from tests._train_helpers import tiny_pair

    student, teacher = tiny_pair(vocab=len(tok), seq=n)
    ids = stream.ids[None]
    th, tw = teacher_outputs(teacher, ids)
    kept = int((labels != -100).sum())
    out = DistillObjective(student, temperature=2.0, kd_weight=0.5, ce_weight=0.5)(
        ids, th, tw, float(kept), labels=labels[None])
    zs = student(input_ids=ids).logits[:, :-1]
    with torch.no_grad():
        zt = teacher(input_ids=ids).logits[:, :-1]
    ref = reference.reference_kd_loss(zs, zt, labels[None], num_items=float(kept),
                                      temperature=2.0, kd_weight=0.5, ce_weight=0.5)
    torch.testing.assert_close(out.loss.double(), ref["loss"], rtol=1e-5, atol=1e-6)
    assert int(out.n_tokens) == kept == sum(expect_targets[1:])
    # Held-out windows of a masked stream carry the same labels (held-out CE on completions).
    (ids_b, lab_b), = streams.eval_batches(stream, 1, n, 1)
    assert torch.equal(lab_b[0], labels)


def test_plain_text_streams_are_the_unmasked_tensor():
    tok = h.tokenizer()
    out = streams.encode(tok, [Document("a b c"), Document("d e")], tok.eos_token_id)
    assert isinstance(out, torch.Tensor)


BAD = [
    ("bad.jsonl", '{"text": "ok"}\n{"text": "fine"}\n{"text": broken}\n',
     r"bad\.jsonl, line 3: invalid JSON"),
    ("nofield.jsonl", '{"text": "ok"}\n{"body": "x", "id": 2}\n',
     r"nofield\.jsonl, line 2: no 'text' field.*'body', 'id'.*--text-field"),
    ("mixed.jsonl", '{"text": "a"}\n\n{"prompt": "p", "completion": "c"}\n',
     r"mixed\.jsonl:3 is a prompt/completion record but mixed\.jsonl:1 is text"),
    ("half.jsonl", '{"prompt": "p"}\n', r"half\.jsonl, line 1: .*'prompt' without 'completion'"),
    ("list.jsonl", '["a", "b"]\n', r"list\.jsonl, line 1: expected a JSON object.*got list"),
    ("num.jsonl", '{"text": 3}\n', r"num\.jsonl, line 1: field 'text' must be a string"),
    ("empty.jsonl", "\n\n", r"empty\.jsonl is empty"),
    ("empty.txt", "  \n", r"empty\.txt is empty"),
    ("array.json", '[\n  {"text": "a"}\n]\n', r"array\.json, line 1: invalid JSON.*JSON Lines"),
    ("blank.jsonl", '{"text": ""}\n{"text": "  "}\n', r"holds no text to train on \(2 empty"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_data_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        documents.read(path)


def test_unreadable_and_non_utf8_files_name_the_file(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"line one\nline \xe9two\n")
    with pytest.raises(ValueError, match=r"latin\.txt, line 2: not UTF-8 text \(byte 0xe9"):
        documents.read(path)
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine text\n")
    # A dangling link: listed like a file, unreadable (chmod cannot stop root from reading).
    (folder / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(ValueError, match=r"cannot read .*gone\.txt"):
        documents.read(folder)
    with pytest.raises(ValueError, match="does not exist"):
        documents.read(tmp_path / "missing")


def test_folders_mixing_formats_or_holding_none_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("text\n")
    h.write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError,
                       match=r"mixes file formats: a\.txt \(text\), b\.jsonl \(JSON Lines\)"):
        documents.read(tmp_path)
    empty = tmp_path / "none"
    empty.mkdir()
    (empty / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="holds no text files"):
        documents.read(empty)


def test_parquet_without_the_field_names_the_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"body": "x"}]).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match=r"b\.parquet has no 'text' column \(columns: body\)"):
        documents.read(tmp_path / "b.parquet")
    datasets.Dataset.from_list([{"text": None}, {"text": 5}]).to_parquet(
        str(tmp_path / "n.parquet"))
    with pytest.raises(ValueError, match=r"n\.parquet, parquet row 0: field 'text'"):
        documents.read(tmp_path / "n.parquet")


def test_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match=r"datasets folder.*kdkernels\[data\]"):
        documents.read(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"parquet file.*kdkernels\[data\]"):
        documents.read(tmp_path / "x.parquet")


def test_corpus_budget_stops_reading_and_says_so(tmp_path):
    data = h.write_jsonl(tmp_path / "t.jsonl", _text_records(10))
    docs = documents.read(data, max_mb=len(h.prose(8)) * 3.5 / 1e6)
    assert len(docs.docs) == 3 and docs.truncated


def _tok_with(extra: str):
    """The shared tokenizer plus one added token: the same ids, then one more."""
    import copy

    tok = copy.deepcopy(h.tokenizer())
    tok.add_tokens([extra])
    return tok


def test_every_rejected_pair_names_why(tmp_path):
    from kdkernels.hf import models
    from kdkernels.train.sources import hf_pair

    tok = h.tokenizer()
    s1000, s900 = (h.save_model(tmp_path / f"s{r}", r) for r in (1000, 900))
    t1024 = h.save_model(tmp_path / "t1024", 1024, tied=False)
    def model(path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path))

    s, t, small = model(s1000), model(t1024), model(s900)
    other = _tok_with("<|other|>")
    with pytest.raises(ValueError, match="tokenizers differ"):
        models.check_pair(s, t, other, tok)
    # A student head smaller than the tokenizer, with no teacher tokenizer (or with one).
    with pytest.raises(ValueError, match=r"student's tokenizer has 1000 tokens but the student "
                                         r"head has 900 rows"):
        models.check_pair(small, t, tok, None)
    with pytest.raises(ValueError, match=r"teacher's tokenizer has 1000 tokens but the student "
                                         r"head has 900 rows"):
        models.check_pair(small, t, None, tok)
    with pytest.raises(ValueError, match="the teacher head has 900 rows"):
        models.check_pair(s, small, tok, tok)
    # No tokenizer at all: only equal heads are trusted.
    with pytest.raises(ValueError, match=r"student vocab \(1000 head rows\) and teacher vocab "
                                         r"\(1024\) differ and neither model has a tokenizer"):
        models.check_pair(s, t)
    models.check_pair(s, model(s1000))
    # The padded pair passes with one tokenizer on either side or both.
    for st, tt in ((tok, tok), (None, tok), (tok, None)):
        models.check_pair(s, t, st, tt)
    # Through the loader: directories without tokenizers, and a bad --teacher-dtype.
    bare_t = h.save_model(tmp_path / "bt", 1024, with_tokenizer=False)
    bare_s = h.save_model(tmp_path / "bs", 1000, with_tokenizer=False)
    with pytest.raises(ValueError, match="neither --teacher .* nor --student .* has a tokenizer"):
        hf_pair.load(str(bare_t), str(bare_s))
    pair = hf_pair.load(str(bare_t), str(s1000), dtype="bf16")
    assert pair.teacher.dtype == torch.bfloat16 and pair.student.dtype == torch.float32
    assert len(pair.tok) == 1000
    with pytest.raises(ValueError, match="--teacher-dtype must be one of fp32, bf16, fp16"):
        hf_pair.load(str(t1024), str(s1000), dtype="int8")
