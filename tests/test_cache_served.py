"""`kdk cache-teacher --teacher-url`: the teacher cache written from a served teacher, against
the real `kdk serve-teacher` on a tiny saved Llama over loopback HTTP.

- scoring --data: the cache equals the one `kdk cache-teacher --teacher DIR` writes in-process
  (through the kdk and the vLLM-style routes); a server killed mid-run stops the run with an
  error naming the URL, only complete shards listed, and the rerun against the restarted
  server completes the same cache; a killed writer resumes;
- --generate: generated sequences cached from the completions route with token ids (targets
  = the teacher's own top-K at the generating positions, nothing elsewhere), and from a
  stdlib http.server answering in the hosted chat format (strings and bytes only), including a
  refusal of a text that does not round-trip; `kdk distill --teacher-cache` trains on it;
- TopKKDTrainer(teacher_client=...) trains against the server and its loss equals the one
  with the same targets as dataset columns.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from kdkernels import cli
from kdkernels.cache import TeacherCache, read_manifest
from kdkernels.cache import format as fmt
from tests._servers import free_port, start_kdk

pytest.importorskip("fastapi", reason="kdk serve-teacher needs the [serve] extra")

ROOT = Path(__file__).resolve().parent.parent
L, SHARD, K = 32, 4, 16
# Both sides compute an fp32 log-softmax of the same fp32 hidden states and head; the server
# batches rows (masked padding, other GEMM shapes), so sums are reordered: a few ulp of a
# log-prob of magnitude ~6 (1 ulp = 4.8e-7). fp32 storage adds no rounding of its own.
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama teacher (vocab 400, hidden 32, 2 layers) with a local BPE, and text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdkernels.train.sources.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("served")
    text = Path(argparse.__file__).read_text()[:6000]
    tok = train_bpe([Path(argparse.__file__).read_text()[:12000]], 400)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a sharper teacher: distinct top-K log-probs, no near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    (root / "data.txt").write_text(text)
    return argparse.Namespace(root=root, teacher=root / "teacher", data=root / "data.txt",
                              model=model.eval(), tok=tok)


@pytest.fixture(scope="module")
def server(tiny):
    s = start_kdk(str(tiny.teacher), tiny.root / "server.log")
    yield s
    s.stop()


def _scoring(tiny, out, *extra) -> list[str]:
    return ["cache-teacher", "--data", str(tiny.data), "--output", str(out), "--seq-len",
            str(L), "--shard-size", str(SHARD), "--top-k", str(K), "--dtype", "fp32",
            "--no-progress", *extra]


def _served(tiny, url, out, *extra) -> list[str]:
    return _scoring(tiny, out, "--teacher-url", url, "--tokenizer", str(tiny.teacher), *extra)


def _tensors(path) -> dict[str, torch.Tensor]:
    ds = TeacherCache(path)
    return {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in fmt.TENSORS}


@pytest.fixture(scope="module")
def in_process(tiny):
    out = tiny.root / "in-process"
    assert cli.main(_scoring(tiny, out, "--teacher", str(tiny.teacher))) == 0
    return _tensors(out)


@pytest.fixture(scope="module")
def served_cache(tiny, server):
    out = tiny.root / "served-kdk"
    assert cli.main(_served(tiny, server.url, out, "--teacher-server", "kdk")) == 0
    return out


# ---- scoring --data ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["kdk", "vllm"])
def test_served_cache_equals_the_in_process_cache(tiny, server, in_process, served_cache,
                                                  kind, tmp_path):
    out = served_cache if kind == "kdk" else tmp_path / "served"
    if kind != "kdk":  # the vLLM route (prompt_logprobs + one generated token) of our server
        assert cli.main(_served(tiny, server.url, out, "--teacher-server", kind)) == 0
    got = _tensors(out)
    assert torch.equal(got["input_ids"], in_process["input_ids"])
    assert torch.equal(got["teacher_ids"], in_process["teacher_ids"])
    torch.testing.assert_close(got["teacher_logprobs"], in_process["teacher_logprobs"],
                               rtol=0, atol=ATOL)
    m, ref = read_manifest(out), read_manifest(tiny.root / "in-process")
    assert m["teacher"] == f"{server.url} ({tiny.teacher})"  # the URL and the served id
    assert m["teacher_server"] == kind and m["complete"]
    for key in ("tokenizer_hash", "data_hash", "seq_len", "top_k", "num_sequences"):
        assert m[key] == ref[key], key


def test_tokenizer_default_against_the_served_embedded_teacher(tiny, tmp_path):
    """--tokenizer default --preset smoke against `kdk serve-teacher --teacher default
    --preset smoke` gives the cache of --teacher default --preset smoke in-process."""
    smoke = ["--preset", "smoke", "--data", str(tiny.root / "small.txt")]
    (tiny.root / "small.txt").write_text(tiny.data.read_text()[:2000])
    srv = start_kdk("default", tmp_path / "server.log", "--preset", "smoke")
    try:
        assert cli.main(_scoring(tiny, tmp_path / "served", "--teacher-url", srv.url,
                                 "--tokenizer", "default", *smoke)) == 0
    finally:
        srv.stop()
    assert cli.main(_scoring(tiny, tmp_path / "in-process", "--teacher", "default",
                             *smoke)) == 0
    got, want = _tensors(tmp_path / "served"), _tensors(tmp_path / "in-process")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["teacher_ids"], want["teacher_ids"])
    torch.testing.assert_close(got["teacher_logprobs"], want["teacher_logprobs"], rtol=0,
                               atol=ATOL)
    assert read_manifest(tmp_path / "served")["teacher"] == f"{srv.url} (default)"


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdkernels.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait_for_shards(out: Path, proc: subprocess.Popen, n: int = 1,
                     timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(read_manifest(out)["shards"]) >= n:
                return
        except ValueError:
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"no shard listed in {out} after {timeout} s")


def test_a_server_killed_mid_run_stops_it_and_a_rerun_resumes(tiny, served_cache, tmp_path):
    """The server dies after the first shard: the client retries, then the command exits 2
    naming the URL, with only complete shards listed; the server restarted on the same port,
    the same command completes the cache (equal to an uninterrupted one)."""
    port = str(free_port())
    log = tmp_path / "server.log"
    srv = start_kdk(str(tiny.teacher), log, "--port", port)
    out = tmp_path / "cache"
    args = _served(tiny, srv.url, out, "--teacher-server", "kdk", "--batch-size", "2")
    try:
        # the writer holds each written shard a moment, so the kill lands mid-run
        proc = _cli(*args, env={"KDKERNELS_CACHE_TEST_PAUSE": "0.5"})
        _wait_for_shards(out, proc)
        srv.proc.kill()
        srv.proc.wait()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert srv.url in err and "complete shards" in err and "rerun" in err, err
        kept = TeacherCache(out, verify=True)  # every listed shard whole, the cache open
        assert not kept.complete and 0 < len(kept) < len(TeacherCache(served_cache))
        srv = start_kdk(str(tiny.teacher), log, "--port", port)
        assert cli.main(args) == 0
    finally:
        srv.stop()
    got, want = _tensors(out), _tensors(served_cache)
    assert torch.equal(got["teacher_ids"], want["teacher_ids"])
    torch.testing.assert_close(got["teacher_logprobs"], want["teacher_logprobs"], rtol=0,
                               atol=ATOL)
    assert read_manifest(out)["complete"]


def test_a_killed_writer_resumes(tiny, server, served_cache, tmp_path, capsys):
    out = tmp_path / "cache"
    args = _served(tiny, server.url, out, "--teacher-server", "kdk")
    proc = _cli(*args, env={"KDKERNELS_CACHE_TEST_PAUSE": "0.5"})
    _wait_for_shards(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not read_manifest(out)["complete"]
    assert cli.main(args) == 0
    assert "resuming" in capsys.readouterr().out
    got, want = _tensors(out), _tensors(served_cache)
    assert torch.equal(got["teacher_ids"], want["teacher_ids"])
    torch.testing.assert_close(got["teacher_logprobs"], want["teacher_logprobs"], rtol=0,
                               atol=ATOL)


@pytest.mark.parametrize("extra,pattern", [
    ([], "--tokenizer DIR|default is required"),
    (["--tokenizer", "TOK", "--teacher", "TEACHER"], "alternatives"),
    (["--tokenizer", "TOK", "--mode", "sample"], "--mode sample"),
    (["--tokenizer", "TOK", "--generate", "4"], "--prompts"),
    (["--tokenizer", "TOK", "--teacher-retries", "-1"], "--teacher-retries must be >= 0"),
])
def test_refusals(tiny, tmp_path, capsys, extra, pattern):
    extra = [str(tiny.teacher) if e in ("TOK", "TEACHER") else e for e in extra]
    args = ["cache-teacher", "--teacher-url", "http://127.0.0.1:9", "--output",
            str(tmp_path / "c"), "--no-progress", *extra]
    assert cli.main(args) == 2
    assert pattern in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_served_flags_need_a_teacher_url(tiny, tmp_path, capsys):
    assert cli.main(_scoring(tiny, tmp_path / "c", "--teacher", str(tiny.teacher),
                             "--tokenizer", str(tiny.teacher))) == 2
    assert "--teacher-url" in capsys.readouterr().err


# ---- --generate: the completions route with token ids ---------------------------------------

PROMPTS = ["def parse_args(self", "The parser reads", "usage: prog [-h]", "class Action",
           "import sys", "return namespace", "if not option", "# the help text"]


def _prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def _generate(tiny, url, out, prompts, *extra) -> list[str]:
    return ["cache-teacher", "--teacher-url", url, "--tokenizer", str(tiny.teacher),
            "--prompts", str(prompts), "--generate", "12", "--top-k", "8", "--dtype", "fp32",
            "--output", str(out), "--shard-size", "3", "--no-progress", *extra]


@pytest.fixture(scope="module")
def generated(tiny, server):
    out = tiny.root / "generated"
    assert cli.main(_generate(tiny, server.url, out, _prompts(tiny.root / "p.jsonl"))) == 0
    return out


def test_generated_sequences_from_the_completions_route(tiny, generated):
    """Each row: the prompt's ids, the generated ids, pads; the generating positions hold the
    teacher's own top-8 of the row (its fp32 log-softmax at T = 1), every other position is
    all empty."""
    m = read_manifest(generated)
    prompts = [tiny.tok(p)["input_ids"] for p in PROMPTS]
    assert m["seq_len"] == max(map(len, prompts)) + 12 and m["layout"] == "generated"
    assert m["num_sequences"] == len(PROMPTS) and m["complete"]
    t = _tensors(generated)
    pad = tiny.tok.pad_token_id
    for s, p in enumerate(prompts):
        P = len(p)
        ids = t["input_ids"][s].long()
        assert ids[:P].tolist() == p
        has = (t["teacher_ids"][s] >= 0).any(-1)
        G = int(has.sum())
        assert 1 <= G <= 12 and has[P - 1:P - 1 + G].all()  # one target per generated token
        assert (ids[P + G:] == pad).all()
        with torch.no_grad():
            lp = torch.log_softmax(tiny.model(ids[None, :P + G]).logits[0].float(), -1)
        top = lp[P - 1:P - 1 + G].topk(8, -1)
        assert torch.equal(t["teacher_ids"][s, P - 1:P - 1 + G].long(), top.indices)
        torch.testing.assert_close(t["teacher_logprobs"][s, P - 1:P - 1 + G], top.values,
                                   rtol=0, atol=ATOL)


def test_a_generated_cache_masks_positions_without_targets(tiny, generated):
    from kdkernels.train.batches.cache_data import CacheData

    data = CacheData.open(generated)
    b = data.train_batch(4, data.seq_len, seed=0, step=0)
    has = (b["teacher_ids"][:, :-1] >= 0).any(-1)
    assert torch.equal(b["labels"] != -100, has)
    assert torch.equal(b["labels"][has], b["input_ids"][:, 1:][has])


def test_distill_trains_on_the_generated_cache(tiny, generated, tmp_path):
    run = tmp_path / "run"
    args = ["distill", "--teacher-cache", str(generated), "--student", str(tiny.teacher),
            "--max-steps", "3", "--batch-size", "2", "--eval-every", "0", "--no-progress",
            "--no-compare-ce", "--threads", "1", "--output", str(run), "--lr", "1e-3"]
    assert cli.main(args) == 0
    rows = [json.loads(x) for x in next(run.rglob("metrics.jsonl")).read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


# ---- --generate: a hosted chat API (strings and bytes only) ---------------------------------

def _generation(tok, text: str, n: int) -> list[int]:
    """The hosted teacher's generated tokens: text's first n tokens, as the tokenizer splits
    the text they spell (so that they round-trip)."""
    ids = tok(text, add_special_tokens=False)["input_ids"][:n]
    return tok(tok.decode(ids), add_special_tokens=False)["input_ids"]


def _first_long(pieces: list[bytes]) -> int:
    return next(j for j, p in enumerate(pieces) if len(p) >= 2)


class _HostedChat(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions like a hosted API: no ids, each token as its string and
    UTF-8 bytes, top_logprobs as strings; refuses vLLM's extras as OpenAI does. The
    generation of prompt i is the i-th slice of argparse's source, tokenised by the real
    tokenizer; for prompt BAD it splits the first token in two (does not round-trip)."""

    tok = None
    texts: list[str] = []
    bad = -1
    requests: list[dict] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "hosted-teacher",
                                                     "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        extra = [k for k in ("return_token_ids", "return_tokens_as_token_ids") if k in body]
        if extra:
            self._send(400, {"error": {"message": f"Unrecognized request argument supplied: "
                                                  f"{extra[0]}", "type": "invalid_request_error",
                                       "param": None, "code": None}})
            return
        i = PROMPTS.index(body["messages"][0]["content"])
        tok = self.tok
        ids = _generation(tok, self.texts[i], body["max_tokens"])
        pieces = [tok.decode([t]).encode() for t in ids]
        if i == self.bad:  # one token sent as two pieces: the text itself is unchanged
            j = _first_long(pieces)
            pieces = pieces[:j] + [pieces[j][:1], pieces[j][1:]] + pieces[j + 1:]
        k = body["top_logprobs"]
        content = []
        for j, piece in enumerate(pieces):
            # the actual token first, then other single tokens, and one two-token string
            others = [tok.decode([(int(ids[min(j, len(ids) - 1)]) + d) % 300 + 1]).encode()
                      for d in (7, 11, 13)]
            cands = [piece] + [o for o in dict.fromkeys(others) if o != piece] + [b"zzzqxq"]
            top = [{"token": c.decode(errors="replace"), "logprob": -0.5 - r,
                    "bytes": list(c)} for r, c in enumerate(cands[:k])]
            content.append({"token": piece.decode(errors="replace"), "logprob": -0.5,
                            "bytes": list(piece), "top_logprobs": top})
        self._send(200, {"id": "x", "object": "chat.completion", "model": "hosted-teacher",
                         "choices": [{"index": 0, "finish_reason": "length",
                                      "message": {"role": "assistant",
                                                  "content": b"".join(pieces).decode()},
                                      "logprobs": {"content": content}}]})


@pytest.fixture
def hosted(tiny):
    _HostedChat.tok = tiny.tok
    src = Path(argparse.__file__).read_text()[12000:]
    _HostedChat.texts = [src[i * 200:i * 200 + 60] for i in range(len(PROMPTS))]
    _HostedChat.bad = -1
    _HostedChat.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _HostedChat)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_generated_sequences_from_a_hosted_chat_api(tiny, hosted, tmp_path, capsys):
    out = tmp_path / "chat"
    args = _generate(tiny, hosted, out, _prompts(tmp_path / "p.jsonl"), "--api-style", "chat",
                     "--top-k", "5", "--batch-size", "2")
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "refused return_token_ids" in err  # asked again without vLLM's extras
    assert "are not single tokens of the local tokenizer" in err  # the two-token string
    body = _HostedChat.requests[-1]
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["max_tokens"] == 12
    t = _tensors(out)
    for s, text in enumerate(_HostedChat.texts):
        p = tiny.tok(PROMPTS[s])["input_ids"]  # the tokenizer has no chat template
        gen = _generation(tiny.tok, text, 12)
        P, G = len(p), len(gen)
        assert t["input_ids"][s, :P + G].tolist() == p + gen
        # generated token j's distribution at position P - 1 + j, the actual token first
        assert t["teacher_ids"][s, P - 1:P - 1 + G, 0].tolist() == gen
        torch.testing.assert_close(t["teacher_logprobs"][s, P - 1:P - 1 + G, 0],
                                   torch.full((G,), -0.5))
        assert ((t["teacher_ids"][s] >= 0).any(-1).nonzero().flatten().tolist()
                == list(range(P - 1, P - 1 + G)))


def test_a_generation_that_does_not_round_trip_is_refused(tiny, hosted, tmp_path, capsys):
    _HostedChat.bad = 4  # in the second shard: the first stays
    out = tmp_path / "chat"
    args = _generate(tiny, hosted, out, _prompts(tmp_path / "p.jsonl"), "--api-style", "chat",
                     "--top-k", "5")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    P = len(tiny.tok(PROMPTS[4])["input_ids"])
    j = _first_long([tiny.tok.decode([t]).encode()
                     for t in _generation(tiny.tok, _HostedChat.texts[4], 12)])
    assert "prompt 4 (--prompts p.jsonl:5)" in err and "does not round-trip" in err, err
    assert f"generated token {j} (sequence position {P + j})" in err, err
    m = read_manifest(out)
    assert m["num_sequences"] == 3 and not m["complete"]


# ---- TopKKDTrainer(teacher_client=...) -------------------------------------------------------

def test_topk_trainer_with_a_teacher_client(tiny, server, tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1")
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from kdkernels.integrations.hf import TopKKDTrainer
    from kdkernels.teachers import KDKTeacher

    torch.manual_seed(1)
    student = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny.tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))
    stream = tiny.tok(tiny.data.read_text())["input_ids"]
    rows = [{"input_ids": torch.tensor(stream[i * 40:i * 40 + 20 + i % 5])} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1,
                             disable_tqdm=True)
    with KDKTeacher(server.url, top_k=K, tokenizer=tiny.tok) as client:
        trainer = TopKKDTrainer(model=student, args=args, train_dataset=rows,
                                teacher_client=client, kd_weight=0.8, ce_weight=0.2)
        batch = trainer.data_collator(rows[:4])
        assert "teacher_ids" not in batch
        online = trainer.compute_loss(student, batch)
        # the same targets as dataset columns, each row scored alone
        cols = []
        for r in rows[:4]:
            i, lp = client.score(r["input_ids"][None])
            cols.append({**r, "teacher_ids": i[0], "teacher_logprobs": lp[0]})
        offline = TopKKDTrainer(model=student, args=args, train_dataset=cols, kd_weight=0.8,
                                ce_weight=0.2)
        ref = offline.compute_loss(student, offline.data_collator(cols))
        torch.testing.assert_close(online, ref, rtol=1e-5, atol=1e-6)
        trainer.train()
        assert client.stats.requests >= 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_topk_trainer_refuses_left_padding_with_a_client(tiny):
    from kdkernels.integrations.hf_topk import served_targets

    class Client:
        def score(self, input_ids):
            raise AssertionError("not reached")

    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        served_targets(Client(), ids, mask)


# ---- the parsers, without a server ----------------------------------------------------------

def test_legacy_completions_strings_and_vllm_ids_parse_to_the_same_row(tiny):
    """A completions answer in token strings (OpenAI's legacy form, no ids, a multi-byte
    character split over two byte tokens spelled "bytes:\\xNN") and the same answer in vLLM's
    "token_id:N" form give the same row; -9999 entries are dropped."""
    from kdkernels.train.sources.generated_sequences import row
    from kdkernels.train.sources.openai_generation import parse
    from kdkernels.train.sources.token_pieces import TokenPieces

    tok, pieces = tiny.tok, TokenPieces(tiny.tok)
    gen = tok("parser é done", add_special_tokens=False)["input_ids"]
    raw = [pieces.bytes_of[i] for i in gen]
    assert any(len(b) == 1 and b[0] >= 0x80 for b in raw)  # é is two byte tokens here

    def spelled(b: bytes) -> str:
        try:
            return b.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b)

    alt = tok("x", add_special_tokens=False)["input_ids"][0]

    def answer(key) -> dict:
        tops = [{key(i): -0.25, key(alt): -2.0, key(5): -9999.0} if i != alt else
                {key(i): -0.25, key(5): -9999.0} for i in gen]
        return {"choices": [{"text": "parser é done", "finish_reason": "length",
                             "logprobs": {"tokens": [key(i) for i in gen],
                                          "token_logprobs": [-0.25] * len(gen),
                                          "top_logprobs": tops}}]}

    prompt = tok("def f", add_special_tokens=False)["input_ids"]
    rows = []
    for key in (lambda i: spelled(pieces.bytes_of[i]), lambda i: f"token_id:{i}"):
        g = parse(answer(key), "completions", "test")
        rows.append(row(prompt, g, pieces, seq_len=len(prompt) + 8 + len(gen), k=3,
                        vocab_size=len(tok), pad_id=0, where="test"))
    (a_ids, a_t, a_lp, _), (b_ids, b_t, b_lp, _) = rows
    assert torch.equal(a_ids, b_ids) and torch.equal(a_t, b_t) and torch.equal(a_lp, b_lp)
    P = len(prompt)
    assert a_ids[P:P + len(gen)].tolist() == gen
    assert a_t[P - 1:P - 1 + len(gen), 0].tolist() == gen
    assert (a_t[P - 1:P - 1 + len(gen), 2] == -1).all()  # -9999 dropped
