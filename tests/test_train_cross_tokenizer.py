"""`kdk distill` across tokenizers: two saved models with different BPEs train with ULD and
GOLD's hybrid (both merges), the first step's loss is `uld_loss` on the models' logits, the
refusals name their flag, held-out quality is in bits per byte, and the cross-tokenizer smoke
preset runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdkernels import cli
from kdkernels.train.config import ModelSize

from . import _data_helpers as dh
from . import _uld_helpers as uh

STUDENT_SIZE, TEACHER_SIZE = ModelSize(32, 1, 2, 64), ModelSize(48, 2, 2, 96)
# Multibyte text (accents, CJK, emoji) that the two BPEs split differently.
TEXT = [uh.CORPUS_STUDENT[:1500], uh.CORPUS_TEACHER[:1500], dh.prose(30, seed=1),
        uh.CORPUS_TEACHER[200:1400] + dh.prose(10, seed=2), dh.prose(25, seed=3)]
COMMON = ["--max-steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--seq-len", "32",
          "--eval-every", "0", "--threads", "1", "--no-progress"]


def _save(path: Path, tok, rows: int, size: ModelSize, seed: int, tied: bool) -> Path:
    from kdkernels.train.sources.tiny_llama import build_llama

    torch.manual_seed(seed)
    model = build_llama(size, rows, 64, eos_id=tok.eos_token_id)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(teacher dir, student dir, data dir): a 420-token teacher BPE with a 424-row untied
    head (padded), a 300-token student BPE with tied embeddings."""
    root = tmp_path_factory.mktemp("cross")
    s_tok, t_tok = uh.tokenizers()
    teacher = _save(root / "teacher", t_tok, uh.VT, TEACHER_SIZE, 2, tied=False)
    student = _save(root / "student", s_tok, uh.VS, STUDENT_SIZE, 1, tied=True)
    data = root / "data"
    data.mkdir()
    for i, text in enumerate(TEXT):
        (data / f"doc{i}.txt").write_text(text)
    return teacher, student, data


def _run(pair, out: Path, *extra: str) -> int:
    teacher, student, data = pair
    return cli.main(["distill", "--teacher", str(teacher), "--student", str(student), "--data",
                     str(data), "-o", str(out), *COMMON, *extra])


def _first_step_reference(pair, mode: str, merge: str) -> float:
    """uld_loss on the saved models' materialised logits for the run's first batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdkernels.train.batches.text_windows import TextWindows
    from kdkernels.train.sources import cross_pair
    from kdkernels.uld import build_vocab_map, uld_loss

    teacher_dir, student_dir, data = pair
    s_tok = AutoTokenizer.from_pretrained(str(student_dir))
    t_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    cfg = dh.config(Path("."), seq_len=32, batch_size=2)
    train_docs, _, _ = cross_pair.documents_of(cfg, str(data))
    b = TextWindows(train_docs, s_tok, t_tok, 32).train_batch(2, 32, seed=0, step=0)
    student = AutoModelForCausalLM.from_pretrained(str(student_dir))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir))
    with torch.no_grad():
        zs = student(input_ids=b["input_ids"]).logits
        zt = teacher(input_ids=b["teacher_input_ids"]).logits
    vmap = build_vocab_map(s_tok, t_tok, uh.VT) if mode == "hybrid" else None
    loss = uld_loss(zs, zt, b["student_labels"], b["teacher_labels"], b["input_ids"],
                    b["teacher_input_ids"], b["student_offsets"], b["teacher_offsets"],
                    merge=merge, vocab_map=vmap, beta=0.5, skip_student_eos=False,
                    skip_teacher_eos=False, distillation_weight=0.8, ce_weight=0.2)
    return float(loss)


@pytest.mark.parametrize(("mode", "merge"), [("uld", "observed"), ("uld", "bayesian"),
                                             ("hybrid", "observed"), ("hybrid", "bayesian")])
def test_different_tokenizers_train_and_step_zero_is_uld_loss(pair, tmp_path, mode, merge):
    from transformers import AutoTokenizer

    from kdkernels.train.runtime import checkpoint

    out = tmp_path / "run"
    assert _run(pair, out, "--cross-tokenizer", mode, "--merge", merge) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"teacher", "kd"}
    for r in results.values():
        assert 0 < r["bits_per_byte"] < 20 and math.isfinite(r["heldout_ce"])
    report = (out / "report.md").read_text()
    assert f"{mode} loss, --cross-tokenizer {mode}" in report and f"merge {merge}" in report
    assert "bits per byte" in report and "not comparable across tokenizers" in report
    records = [json.loads(x) for x in (out / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 2
    # Step 0 (logged as step 1, before the update) against uld_loss on materialised fp32
    # logits of the same batch. Both are fp32 and may differ only by the order of their sums
    # (GEMM blocking, the sorted L1 over <= 424 columns, ~30 groups a sample): a few ulps of
    # fp32 (6e-8) per term, ~1e-7 relative in the total. They agree bit for bit here at one
    # thread; 1e-6 leaves room for other blockings and still catches any term or weight out
    # of place (a misplaced group, merge scalar or normalisation moves the loss by >= 1e-3).
    expect = _first_step_reference(pair, mode, merge)
    assert records[0]["loss"] == pytest.approx(expect, rel=1e-6)
    # The checkpoint carries the student's own tokenizer.
    tok = AutoTokenizer.from_pretrained(str(checkpoint.latest(out / "kd")))
    assert len(tok) == uh.VS


def test_default_mode_follows_the_overlap(pair, tmp_path):
    from kdkernels.train.sources.cross_pair import choose_mode

    assert choose_mode(None, 51, 100)[0] == "hybrid"
    assert choose_mode(None, 50, 100)[0] == "uld"  # more than half, not half
    assert choose_mode("uld", 90, 100)[0] == "uld"
    out = tmp_path / "run"
    assert _run(pair, out, "--max-steps", "1") == 0
    s_tok, t_tok = uh.tokenizers()
    from kdkernels.uld import build_vocab_map

    share = int((build_vocab_map(s_tok, t_tok, uh.VT) >= 0).sum()) / len(t_tok)
    want = "hybrid" if share > 0.5 else "uld"
    assert f"{want} loss, default ({int(share * len(t_tok))} of the teacher's 420 tokens" in \
        (out / "report.md").read_text()


@pytest.mark.parametrize(("extra", "flag"), [
    (["--cross-tokenizer", "uld"], "--cross-tokenizer"),
    (["--merge", "bayesian"], "--merge"),
])
def test_cross_flags_with_one_shared_tokenizer_are_refused(tmp_path, capsys, extra, flag):
    teacher, student = dh.qwen_pair(tmp_path)
    data = dh.write_jsonl(tmp_path / "d.jsonl", [{"text": dh.prose(20, seed=i)} for i in range(4)])
    code = cli.main(["distill", "--teacher", str(teacher), "--student", str(student), "--data",
                     str(data), "-o", str(tmp_path / "o"), *COMMON, *extra])
    err = capsys.readouterr().err
    assert code == 2 and flag in err and "share one tokenizer" in err


@pytest.mark.parametrize(("extra", "flag"), [
    (["--baseline", "naive"], "--baseline naive"),
    (["--divergence", "reverse_kl"], "--divergence"),
    (["--on-policy", "0.5"], "--on-policy"),
])
def test_options_a_cross_tokenizer_run_cannot_honour_are_refused(pair, tmp_path, capsys,
                                                                  extra, flag):
    assert _run(pair, tmp_path / "o", *extra) == 2
    assert flag in capsys.readouterr().err


def test_cross_flags_without_a_pair_and_hybrid_without_overlap_are_refused(tmp_path, capsys):
    from kdkernels.train.sources.cross_pair import choose_mode

    code = cli.main(["distill", "--preset", "smoke", "--merge", "bayesian", "-o",
                     str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "--merge applies to a teacher and a student with different " \
                         "tokenizers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--cross-tokenizer hybrid .* share none"):
        choose_mode("hybrid", 0, 420)


def test_help_defines_the_overlap(capsys):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--cross-tokenizer {uld,hybrid}" in text and "--merge {observed,bayesian}" in text
    assert "overlap = teacher tokens whose string is also a student token" in text


def test_bits_per_byte_of_a_uniform_model_is_log2_v_tokens_over_bytes(pair):
    from transformers import AutoModelForCausalLM

    from kdkernels.train.batches.text_windows import HeldOut, TextWindows
    from kdkernels.train.runtime.bits_per_byte import bits_per_byte, heldout_bits_per_byte

    assert bits_per_byte(math.log(2) * 24, 8) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="bytes"):
        bits_per_byte(1.0, 0)
    teacher_dir, student_dir, _ = pair
    s_tok, t_tok = uh.tokenizers()
    docs = [("", t) for t in TEXT]
    held = TextWindows(docs, s_tok, t_tok, 32).heldout(docs, 4, 2)
    assert held.student_bytes == held.teacher_bytes > 0  # the same text on both sides
    for path, batches, vocab in ((student_dir, held.student, uh.VS),
                                 (teacher_dir, held.teacher, uh.VT)):
        model = AutoModelForCausalLM.from_pretrained(str(path))
        with torch.no_grad():
            model.get_output_embeddings().weight.zero_()  # logits 0: uniform over the head
        got = heldout_bits_per_byte(model, batches, held.student_bytes, torch.device("cpu"))
        want = math.log2(vocab) * HeldOut.tokens(batches) / held.student_bytes
        assert got["bits_per_byte"] == pytest.approx(want, rel=1e-6)


def test_windows_cover_the_same_text_on_both_sides():
    from kdkernels.train.batches.text_windows import TextWindows
    from kdkernels.uld import align_batch

    s_tok, t_tok = uh.tokenizers()
    docs = [("", t) for t in TEXT]
    wins = TextWindows(docs, s_tok, t_tok, 24)
    b = wins.train_batch(6, 24, seed=3, step=1)
    assert b["input_ids"].shape[1] <= 24 and b["teacher_input_ids"].shape[1] <= 24
    assert b["labels"].shape[1] == b["input_ids"].shape[1] - 1
    for row in range(6):
        texts = []
        for ids_key, lab_key in (("input_ids", "student_labels"),
                                 ("teacher_input_ids", "teacher_labels")):
            keep = b[lab_key][row] != -100
            tok = s_tok if ids_key == "input_ids" else t_tok
            texts.append(tok.decode(b[ids_key][row][keep].tolist()))
            assert b[lab_key][row][0] == -100  # the BOS is context, never a label
        assert texts[0] == texts[1]
        s_end = b["student_offsets"][row][b["student_labels"][row] != -100][-1, 1]
        t_end = b["teacher_offsets"][row][b["teacher_labels"][row] != -100][-1, 1]
        assert int(s_end) == int(t_end) == len(texts[0].replace("<|endoftext|>", "")
                                               .encode("utf-8"))
    groups = align_batch(b["student_labels"], b["teacher_labels"], b["input_ids"],
                         b["teacher_input_ids"], b["student_offsets"], b["teacher_offsets"],
                         skip_student_eos=False, skip_teacher_eos=False)
    assert bool((groups.groups_per_sample > 0).all())
    # a pure function of (seed, step, micro, rank)
    again = wins.train_batch(6, 24, seed=3, step=1)
    assert all(torch.equal(b[k], again[k]) for k in b)


@pytest.mark.slow
def test_cross_tokenizer_smoke_preset_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKERNELS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert cli.main(["distill", "--preset", "cross-tokenizer-smoke", "-o", str(out),
                     "--no-progress", "--threads", "1"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"teacher", "ce", "uld", "hybrid"}
    for r in results.values():
        assert 0 < r["bits_per_byte"] < 20
    report = (out / "report.md").read_text()
    assert "held-out bits per byte" in report and "not comparable across tokenizers" in report
    assert "its own 400-token BPE" in report and "the embedded 512-token BPE" in report
    assert "bits/byte vs CE only" in report
    # The presets refuse models and data of their own.
    assert cli.main(["distill", "--preset", "cross-tokenizer-smoke", "--teacher", "x", "-o",
                     str(tmp_path / "o2"), "--no-progress"]) == 2


def test_prompt_completion_records_train_on_the_completion(pair, tmp_path):
    from transformers import AutoTokenizer

    from kdkernels.train.batches.text_windows import TextWindows

    teacher, student, _ = pair
    records = [{"prompt": p, "completion": c} for p, c in zip(uh.PROMPTS, uh.COMPLETIONS,
                                                              strict=True)] * 3
    data = dh.write_jsonl(tmp_path / "pc.jsonl", records)
    out = tmp_path / "run"
    assert cli.main(["distill", "--teacher", str(teacher), "--student", str(student), "--data",
                     str(data), "-o", str(out), *COMMON, "--cross-tokenizer", "uld"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert all(0 < r["bits_per_byte"] < 40 for r in results.values())
    s_tok = AutoTokenizer.from_pretrained(str(student))
    t_tok = AutoTokenizer.from_pretrained(str(teacher))
    docs = [(r["prompt"], r["completion"]) for r in records]
    # 64 tokens hold every record whole (the run's 32 cut the longest: their EOS first)
    b = TextWindows(docs, s_tok, t_tok, 64).train_batch(4, 64, seed=0, step=0)
    for row in range(4):  # labels: the completion and its EOS, never the prompt
        ids = b["input_ids"][row][b["student_labels"][row] != -100].tolist()
        assert ids[-1] == s_tok.eos_token_id and s_tok.decode(ids[:-1]) in uh.COMPLETIONS
