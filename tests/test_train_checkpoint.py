"""Checkpoints and run files survive a kill at any point of their write: the `latest` marker,
run.json / results.json and metrics.jsonl are replaced atomically, every rank's files are on
disk before the marker names them, and a resume with nothing left to train leaves the
checkpoint it resumed from alone. (The SIGKILL-then-resume run is in test_train_cache.py.)"""

from __future__ import annotations

import builtins
import io
import json
from pathlib import Path

import pytest
import torch

from kdkernels.train.batches import windows
from kdkernels.train.objectives.dense import DistillObjective
from kdkernels.train.runtime import checkpoint, distributed, loop, metrics
from kdkernels.train.runtime.lr_schedule import warmup_cosine
from tests._train_helpers import tiny_config, tiny_pair, token_stream


class _Killed(Exception):
    """Stands for a kill between opening a file for writing and writing it."""


def _die_on_write(monkeypatch, prefix: str) -> None:
    """Files whose name starts with prefix, opened for writing (so already created or
    truncated), die at their first write: where a kill mid-save leaves them."""
    real = io.open

    def opener(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax") and Path(str(file)).name.startswith(prefix):
            def killed(*_a, **_k):
                raise _Killed(file)
            f.write = killed
        return f

    monkeypatch.setattr(io, "open", opener)
    monkeypatch.setattr(builtins, "open", opener)


def _parts():
    student, _ = tiny_pair()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    return student, opt, warmup_cosine(opt, 1, 4, 0.1)


def test_a_kill_while_the_marker_is_written_leaves_the_previous_checkpoint(tmp_path,
                                                                         monkeypatch):
    student, opt, sched = _parts()
    ckpts = tmp_path / "run" / "checkpoints"
    kw = dict(fingerprint={"x": 1})
    checkpoint.save(ckpts / "step-000002", student, None, opt, sched, step=2, **kw)
    _die_on_write(monkeypatch, checkpoint.MARKER)
    with pytest.raises(_Killed):
        checkpoint.save(ckpts / "step-000004", student, None, opt, sched, step=4, **kw)
    monkeypatch.undo()
    ckpt = checkpoint.latest(tmp_path / "run")
    assert ckpt == ckpts / "step-000002"
    assert checkpoint.check_fingerprint(ckpt, {"x": 1})["step"] == 2
    # the next save clears the killed one's temporary marker
    checkpoint.save(ckpts / "step-000004", student, None, opt, sched, step=4, **kw)
    assert checkpoint.latest(tmp_path / "run") == ckpts / "step-000004"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_file()) == [checkpoint.MARKER]


def test_a_kill_while_run_json_is_rewritten_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    checkpoint.write_json(path, {"fingerprint": {"lr": 1}})
    _die_on_write(monkeypatch, "run.json")
    with pytest.raises(_Killed):
        checkpoint.write_json(path, {"fingerprint": {"lr": 2}})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"fingerprint": {"lr": 1}}


def test_metrics_survive_a_kill_while_resuming_and_a_torn_last_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
    assert metrics.read(path) == records  # the append a kill cut short is dropped
    _die_on_write(monkeypatch, "metrics.jsonl")
    with pytest.raises(_Killed):  # killed while the resume drops the records after step 2
        metrics.JsonlLog(path, resume_step=2)
    monkeypatch.undo()
    assert metrics.read(path) == records
    metrics.JsonlLog(path, resume_step=2)
    assert metrics.read(path) == records[:2]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')  # damage inside the file still raises
    with pytest.raises(json.JSONDecodeError):
        metrics.read(path)


def test_the_marker_waits_for_every_rank(tmp_path):
    """Under DDP/FSDP every rank writes its own optimizer/RNG file: rank 0 names the
    checkpoint only after the barrier that every rank reaches once its file is written."""
    student, opt, sched = _parts()
    ckpts = tmp_path / "checkpoints"
    seen = []

    def barrier() -> None:
        seen.append(((ckpts / checkpoint.MARKER).exists(),
                     (ckpts / "step-000001" / "rank0.pt").exists()))

    checkpoint.save(ckpts / "step-000001", student, None, opt, sched, step=1,
                    fingerprint={}, barrier=barrier)
    assert seen == [(False, True)]
    assert (ckpts / checkpoint.MARKER).read_text() == "step-000001"


def test_resuming_a_finished_stage_leaves_its_checkpoint_alone(tmp_path):
    """A resume with no step left (a later stage was interrupted) rewrote the checkpoint the
    marker names, in place: a kill then left no complete checkpoint. Now it is not touched."""
    cfg = tiny_config(tmp_path, max_steps=2)
    tokens, held = token_stream(), windows.eval_batches(token_stream(seed=9), 2, 16, 1)

    def stage(resume=None):
        student, teacher = tiny_pair()
        obj = DistillObjective(student, temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                               ce_weight=cfg.ce_weight)
        return loop.Stage("kd", obj, teacher, cfg.max_steps, cfg.lr, cfg.seed, tmp_path / "kd",
                          resume=resume, fingerprint=cfg.fingerprint())

    world = distributed.World()
    first = loop.train(stage(), cfg, tokens, held, world)
    ckpt = checkpoint.latest(tmp_path / "kd")
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    again = loop.train(stage(resume=ckpt), cfg, tokens, held, world)
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before
    assert checkpoint.latest(tmp_path / "kd") == ckpt
    assert again["steps"] == 2 and again["heldout_ce"] == first["heldout_ce"]
