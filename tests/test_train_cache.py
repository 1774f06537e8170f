"""`kdk distill --teacher-cache`: training from a teacher-logit cache (tiny random Llamas with
a BPE tokenizer): the loss goes down, --resume is bit for bit, grad accumulation is one big
batch, tails, refusals of a foreign tokenizer or vocabulary, deterministic batches, 2-rank DDP
and the embedded default's top-k student."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import kdkernels
from kdkernels import cli
from kdkernels.cache import TeacherCache, scoring, tokenizer_hash, write_cache
from kdkernels.train import pipeline
from kdkernels.train import report as run_report
from kdkernels.train.batches.cache_data import CacheData
from kdkernels.train.config import ModelSize, TrainConfig
from kdkernels.train.objectives.topk import TopKObjective
from kdkernels.train.runtime import checkpoint, distributed, loop, metrics
from kdkernels.train.sources.teacher_cache import check_student
from kdkernels.train.sources.tiny_llama import build_llama
from kdkernels.train.sources.tokenizer import train_bpe

SEQ = 16
K = 8
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 40


@pytest.fixture(scope="module")
def tok():
    return train_bpe([TEXT], 300)


def _stream(tok, n: int) -> torch.Tensor:
    """Token ids of the text with some noise, as [n, SEQ] sequences."""
    ids = torch.tensor(tok.encode(TEXT) * 4)[: n * SEQ]
    g = torch.Generator().manual_seed(5)
    noise = torch.randint(0, len(tok), ids.shape, generator=g)
    return torch.where(torch.rand(ids.shape, generator=g) < 0.2, noise, ids).view(n, SEQ)


def _write(path: Path, tok, ids: torch.Tensor, *, meta: dict | None = None,
           teacher_ids: torch.Tensor | None = None) -> Path:
    torch.manual_seed(2)
    teacher = build_llama(ModelSize(48, 2, 2, 96), len(tok), SEQ).eval()
    tids, tlps = scoring.score(teacher, scoring.Head.of(teacher), ids, mode="topk", k=K,
                               samples=1, seed=0, first_index=0, device=torch.device("cpu"))
    if teacher_ids is not None:
        tids = teacher_ids
    base = {"tokenizer_hash": tokenizer_hash(tok), "teacher": "tiny", "vocab_size": len(tok),
            "dtype": "bf16"}
    write_cache(path, ids, tids, tlps, meta={**base, **(meta or {})}, shard_size=16)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tok) -> Path:
    return _write(tmp_path_factory.mktemp("cache") / "c", tok, _stream(tok, 40))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tok) -> Path:
    path = tmp_path_factory.mktemp("student") / "s"
    torch.manual_seed(3)
    build_llama(ModelSize(32, 1, 2, 64), len(tok), SEQ).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(max_steps=8, warmup_steps=1, batch_size=2, seq_len=SEQ, eval_every=0,
                eval_batches=1, progress=False, output=str(out), lr=1e-2, threads=1,
                temperature=1.0, kd_weight=0.8, ce_weight=0.2)
    return TrainConfig(**{**base, **kw})


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics.read(run_dir / "metrics.jsonl") if "loss" in r]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint.latest(run_dir) / "model.safetensors"))


def test_trains_from_a_cache_and_the_loss_goes_down(tmp_path, cache_dir, student_dir):
    out = tmp_path / "run"
    res = pipeline.run(_cfg(out, max_steps=10), student_path=str(student_dir),
                       teacher_cache=str(cache_dir))
    assert set(res) == {"topk"}  # no teacher model, no CE student unless asked
    losses = _losses(out / "topk")
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3])
    assert res["topk"]["cache"]["top_k"] == K
    assert 0 < res["topk"]["heldout_ce"] < 10
    report = (out / "report.md").read_text()
    assert "bytes per token" in report and "last ones" in report  # held out from the cache


def _config_block(report: str) -> dict[str, str]:
    block = report.split("Configuration:", 1)[1].split("```")[1]
    return dict(line.split(" = ", 1) for line in block.strip().splitlines())


def test_report_names_a_sampled_cache_by_its_samples(tmp_path, tok, student_dir):
    """A sample-mode cache (12 draws per position in K = 8 slots) is reported as such, never
    as top-8 (which it is not: its ids are the distinct sampled ones)."""
    ids = _stream(tok, 8)
    torch.manual_seed(2)
    teacher = build_llama(ModelSize(48, 2, 2, 96), len(tok), SEQ).eval()
    tids, tlps = scoring.score(teacher, scoring.Head.of(teacher), ids, mode="sample", k=K,
                               samples=12, seed=0, first_index=0, device=torch.device("cpu"))
    cache = tmp_path / "sampled"
    write_cache(cache, ids, tids, tlps, meta={"tokenizer_hash": tokenizer_hash(tok),
                                              "vocab_size": len(tok), "mode": "sample",
                                              "samples": 12, "seed": 0})
    out = tmp_path / "run"
    res = pipeline.run(_cfg(out, max_steps=2), student_path=str(student_dir),
                       teacher_cache=str(cache))
    report = (out / "report.md").read_text()
    assert "student, 12-sample KD (cache)" in report
    assert "12 samples per position in K = 8 slots" in report
    assert "top-8" not in report and "K = 8 bf16" not in report
    assert res["topk"]["cache"]["mode"] == "sample" and res["topk"]["cache"]["samples"] == 12


def test_report_lists_only_the_settings_the_run_used(tmp_path, cache_dir, student_dir):
    """--student with --teacher-cache: none of the embedded default's model, tokenizer or
    corpus settings, nor --teacher-dtype or generation options, in the Configuration."""
    out = tmp_path / "run"
    pipeline.run(_cfg(out, max_steps=2), student_path=str(student_dir),
                 teacher_cache=str(cache_dir))
    listed = _config_block((out / "report.md").read_text())
    embedded = {"teacher_size", "student_size", "teacher_steps", "teacher_lr", "vocab_size",
                "cache_top_k", "corpus_max_mb"}
    unused = embedded | {"teacher_dtype", "text_field", "on_policy", "seq_kd", "prompts"}
    assert not unused & set(listed), sorted(unused & set(listed))
    assert listed["tail"] == "bucket" and listed["seq_len"] == str(SEQ)
    assert {"lr", "max_steps", "kd_weight", "divergence", "heldout_fraction"} <= set(listed)
    # the other sources: each keeps what it reads
    cfg = _cfg(out).to_dict()
    hf = run_report.run_settings(cfg, kind="hf", student=True, data=True, topk=False)
    assert "teacher_dtype" in hf and "text_field" in hf and "corpus_max_mb" in hf  # --data's
    assert not (embedded - {"corpus_max_mb"}) & set(hf)
    assert "tail" not in hf
    default = run_report.run_settings(cfg, kind="embedded", student=False, data=False, topk=True)
    assert embedded <= set(default) and "teacher_dtype" not in default and "tail" in default
    own = run_report.run_settings(cfg, kind="cache", student=False, data=False, topk=True)
    assert {"student_size", "vocab_size", "corpus_max_mb"} <= set(own)
    assert "teacher_size" not in own


def test_heldout_sequences_are_never_trained_on(cache_dir):
    data = CacheData.open(cache_dir, heldout_fraction=0.1)
    assert data.train == range(0, 36) and data.held == range(36, 40)
    seen = set()
    for step in range(18):  # one epoch: 36 sequences, 2 per batch
        b = data.train_batch(2, SEQ, seed=1, step=step)
        seen |= {tuple(r.tolist()) for r in b["input_ids"]}
    train = {tuple(data.cache[i]["input_ids"].long().tolist()) for i in data.train}
    held = {tuple(data.cache[i]["input_ids"].long().tolist()) for i in data.held}
    assert seen == train and not seen & (held - train)
    assert len(data.heldout_batches(2, SEQ, 1)) == 1


def test_cache_batches_are_deterministic_and_ranks_disjoint(cache_dir):
    data = CacheData.open(cache_dir)
    kw = dict(seed=1, step=3, micro=1, grad_accum=2, world_size=2)
    a = data.train_batch(4, 8, rank=0, **kw)
    assert all(torch.equal(a[k], v) for k, v in data.train_batch(4, 8, rank=0, **kw).items())
    b = data.train_batch(4, 8, rank=1, **kw)
    assert not torch.equal(a["input_ids"], b["input_ids"])
    assert a["teacher_ids"].shape == (4, 8, K) and a["input_ids"].dtype == torch.int64
    with pytest.raises(ValueError, match="--seq-len 32 is longer than the teacher cache"):
        data.train_batch(4, 32, rank=0, **kw)


def test_resume_is_bit_for_bit(tmp_path, cache_dir, student_dir, monkeypatch):
    kw = dict(student_path=str(student_dir), teacher_cache=str(cache_dir))
    full = tmp_path / "full"
    pipeline.run(_cfg(full, max_steps=6, grad_accum=2), **kw)

    real = CacheData.train_batch

    def batch_then_interrupt(self, *a, step, micro=0, **k):
        if step == 2 and micro == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, step=step, micro=micro, **k)

    cut = tmp_path / "cut"
    monkeypatch.setattr(CacheData, "train_batch", batch_then_interrupt)
    res = pipeline.run(_cfg(cut, max_steps=6, grad_accum=2), **kw)
    assert res["topk"]["interrupted"] and res["topk"]["steps"] == 3
    monkeypatch.setattr(CacheData, "train_batch", real)
    pipeline.run(_cfg(cut, max_steps=6, grad_accum=2), resume=True, **kw)
    a, b = _weights(full / "topk"), _weights(cut / "topk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(full / "topk") == _losses(cut / "topk")
    with pytest.raises(ValueError, match="different configuration.*tail"):
        pipeline.run(_cfg(cut, max_steps=6, grad_accum=2, tail="zero"), resume=True, **kw)


def _killed_at(point: str, argv: list[str]) -> None:
    """Run `kdk argv` in a subprocess and SIGKILL it once it announces the checkpoint test
    pause ``point`` (checkpoint.TEST_PAUSE): it is then inside that save."""
    import queue
    import subprocess
    import sys
    import threading
    import time

    env = {**os.environ, checkpoint.TEST_PAUSE: point}
    proc = subprocess.Popen([sys.executable, "-m", "kdkernels.cli", *argv], env=env,
                            cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 180
    try:
        while f"checkpoint test pause: {point}" not in "".join(seen[-1:]):
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                if proc.poll() is not None and lines.empty():
                    pytest.fail(f"the run ended before pausing at {point}: "
                                f"{''.join(seen)[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no pause at {point} within 180 s: {''.join(seen)[-2000:]}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before-marker", "before-rename"])
def test_sigkill_during_a_save_then_resume_equals_an_uninterrupted_run(
        tmp_path, cache_dir, student_dir, point):
    """Killed inside the save of step 4 (its folder written but the marker not replaced, or
    the marker's temporary file written but not renamed): the marker still names the
    complete step-2 checkpoint, and --resume ends bit for bit where a run never killed ends."""
    def argv(out: Path, *extra: str) -> list[str]:
        return ["distill", "--teacher-cache", str(cache_dir), "--student", str(student_dir),
                "--max-steps", "6", "--warmup-steps", "1", "--batch-size", "2", "--lr", "1e-2",
                "--save-every", "2", "--eval-every", "0", "--threads", "1", "--no-progress",
                "-o", str(out), *extra]

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli.main(argv(full)) == 0
    _killed_at(f"{point}:4", argv(cut))
    ckpts = cut / "topk" / "checkpoints"
    assert (ckpts / "step-000004" / checkpoint.STATE).exists()  # the kill was inside step 4
    assert checkpoint.latest(cut / "topk") == ckpts / "step-000002"
    leftovers = [p.name for p in ckpts.iterdir() if ".tmp" in p.name]
    assert bool(leftovers) == (point == "before-rename"), leftovers
    assert cli.main([*argv(cut), "--resume"]) == 0
    assert checkpoint.latest(cut / "topk") == ckpts / "step-000006"
    assert not [p.name for p in ckpts.iterdir() if ".tmp" in p.name]
    a, b = _weights(full / "topk"), _weights(cut / "topk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(full / "topk") == _losses(cut / "topk") and len(_losses(cut / "topk")) == 6
    ce = [json.loads((d / "results.json").read_text())["results"]["topk"]["heldout_ce"]
          for d in (full, cut)]
    assert ce[0] == ce[1]


def test_grad_accumulation_with_num_items_equals_one_big_batch(cache_dir, student_dir):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(student_dir))
    obj = TopKObjective(student, tail="bucket", kd_weight=0.7, ce_weight=0.3)
    b = CacheData.open(cache_dir).train_batch(4, SEQ, seed=0, step=0)
    n = float(4 * (SEQ - 1))

    def grads():
        g = torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])
        student.zero_grad()
        return g

    obj(b["input_ids"], b["teacher_ids"], b["teacher_logprobs"], n).loss.backward()
    big = grads()
    for part in (slice(0, 1), slice(1, 4)):
        obj(b["input_ids"][part], b["teacher_ids"][part], b["teacher_logprobs"][part],
            n).loss.backward()
    torch.testing.assert_close(grads(), big, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "zero"])
def test_each_tail_is_the_library_loss_on_shifted_rows(cache_dir, student_dir, tail):
    from transformers import AutoModelForCausalLM

    from kdkernels.hf import models

    student = AutoModelForCausalLM.from_pretrained(str(student_dir))
    b = CacheData.open(cache_dir).train_batch(2, SEQ, seed=0, step=1)
    out = TopKObjective(student, tail=tail, kd_weight=0.6, ce_weight=0.4)(
        b["input_ids"], b["teacher_ids"], b["teacher_logprobs"], 30.0)
    h = models.hidden_states(student, b["input_ids"])[:, :-1]
    want = kdkernels.fused_linear_topk_kd_loss(
        h, models.head(student)[0], b["teacher_ids"][:, :-1], b["teacher_logprobs"][:, :-1],
        b["input_ids"][:, 1:], tail=tail, kd_weight=0.6, ce_weight=0.4, num_items=30.0,
        return_components=True)
    torch.testing.assert_close(out.loss, want.loss)
    assert int(out.n_tokens) == 2 * (SEQ - 1)


def test_cli_trains_with_each_tail_option(tmp_path, cache_dir, student_dir):
    losses = {}
    for tail in ("renormalize", "zero"):
        out = tmp_path / tail
        argv = ["distill", "--teacher-cache", str(cache_dir), "--student", str(student_dir),
                "--tail", tail, "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "2",
                "--eval-every", "0", "--threads", "1",
                "--no-progress", "-o", str(out)]
        assert cli.main(argv) == 0
        run = json.loads((out / "run.json").read_text())["fingerprint"]
        assert run["tail"] == tail and run["seq_len"] == SEQ  # --seq-len from the cache
        losses[tail] = _losses(out / "topk")
    assert losses["renormalize"] != losses["zero"]


def test_divergence_without_a_topk_form_is_refused(tmp_path, cache_dir, student_dir):
    with pytest.raises(ValueError, match="jsd.*tail='zero'"):
        pipeline.run(_cfg(tmp_path / "o", divergence="jsd", tail="zero"),
                     student_path=str(student_dir),
                     teacher_cache=str(cache_dir))


def test_teacher_and_cache_together_are_refused(tmp_path, cache_dir, student_dir):
    with pytest.raises(ValueError, match="--teacher-cache replaces --teacher"):
        pipeline.run(_cfg(tmp_path / "o"), teacher_path=str(student_dir),
                     student_path=str(student_dir), teacher_cache=str(cache_dir))


def test_foreign_tokenizer_is_refused_naming_both_hashes(tmp_path, tok, student_dir):
    path = _write(tmp_path / "c", tok, _stream(tok, 4), meta={"tokenizer_hash": "f" * 64})
    with pytest.raises(ValueError) as err:
        pipeline.run(_cfg(tmp_path / "o"), student_path=str(student_dir),
                     teacher_cache=str(path))
    msg = str(err.value)
    assert "f" * 64 in msg and tokenizer_hash(tok) in msg and str(student_dir) in msg


def test_vocabulary_larger_than_the_student_head_is_refused(tmp_path, tok, student_dir):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(student_dir))
    rows = len(tok)
    path = _write(tmp_path / "big", tok, _stream(tok, 4), meta={"vocab_size": rows + 5})
    with pytest.raises(ValueError, match=f"vocab_size {rows + 5}.*head has {rows} rows"):
        check_student(TeacherCache(path), student, tok, "S")
    # no vocab_size in the manifest: the ids themselves are read
    ids = _stream(tok, 4)
    tids = torch.full((4, SEQ, K), -1, dtype=torch.int32)
    tids[..., 0] = rows + 2
    path = _write(tmp_path / "ids", tok, ids, meta={"vocab_size": None}, teacher_ids=tids)
    with pytest.raises(ValueError, match=f"token id {rows + 2}.*head has {rows} rows"):
        check_student(TeacherCache(path), student, tok, "S")


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, cache: str,
                student: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    world = distributed.init("cpu")
    cfg = _cfg(Path(out_dir), max_steps=3)
    model = AutoModelForCausalLM.from_pretrained(student)
    data = CacheData.open(cache, heldout_fraction=0.1)
    stage = loop.Stage("ddp", TopKObjective(model), None, 3, 1e-2, 0, Path(out_dir) / "ddp")
    loop.train(stage, cfg, data, data.heldout_batches(2, SEQ, 1), world)
    flat = torch.cat([p.detach().reshape(-1) for p in model.state_dict().values()])
    torch.save(flat, Path(out_dir) / f"rank{rank}.pt")
    distributed.shutdown()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_gloo_ddp_from_a_cache_ends_identical(tmp_path, cache_dir, student_dir):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), str(cache_dir), str(student_dir)),
             nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0, r1)


@pytest.mark.slow
def test_embedded_smoke_run_adds_a_topk_student_on_the_dense_batches(tmp_path, monkeypatch):
    from kdkernels.train.config import preset
    from kdkernels.train.sources import embedded_cache, training_data

    monkeypatch.setenv("KDKERNELS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    cfg = preset("smoke", cache_top_k=8, output=str(out), progress=False, threads=1)
    res = pipeline.run(cfg, preset="smoke")
    assert list(res) == ["teacher", "kd", "topk", "ce"]
    info = res["topk"]["cache"]
    assert info["top_k"] == 8 and info["write_s"] > 0
    assert info["bytes_per_token"] > 4 + 8 * 6  # ids + bf16 log-probs, plus headers
    cache = TeacherCache(out / "topk-cache")
    tok, train_ids, *_ = training_data.prepare(cfg, None, None, distributed.World())
    windows = embedded_cache.dense_windows(cfg, train_ids, 1)
    assert torch.equal(torch.stack([cache[i]["input_ids"] for i in range(len(cache))]).long(),
                       windows)
    report = (out / "report.md").read_text()
    assert "top-8 KD" in report and "of the dense KD benefit" in report
    assert "bytes per token" in report and "written in" in report
    summary = json.loads((out / "results.json").read_text())
    assert "kept" in summary["topk"]
    assert (out / "report.png").stat().st_size > 1000
    # that cache into the embedded student (no --student): top-k and CE-only on its sequences
    again = tmp_path / "again"
    cfg = preset("smoke", output=str(again), progress=False, threads=1)
    res = pipeline.run(cfg, teacher_cache=str(out / "topk-cache"), preset="smoke")
    assert list(res) == ["topk", "ce"] and res["topk"]["heldout_ce"] < 10
