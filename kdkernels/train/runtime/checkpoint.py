"""Checkpoints that resume bit-for-bit: the model through save_pretrained (loadable with
AutoModelForCausalLM.from_pretrained), plus optimizer, scheduler and every RNG state.

Each checkpoint is a folder of its own; ``checkpoints/latest`` names the newest complete one.
A save writes the folder (every rank its files, each fsynced), waits for every rank, then
replaces the marker atomically (temporary file, fsync, rename, fsync of the directory), so a
kill at any point leaves a marker naming a complete checkpoint: the new one or the one before.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...cache.format import TMP_MARK, atomic_write_bytes, fsync_dir
from ..config import saved_fingerprint

STATE = "trainer_state.pt"
MARKER = "latest"
# Tests only: "<point>:<step>" holds the save of that step at that point (announced on
# stderr) so that a test can kill the process there: "before-marker" (the folder written,
# the marker not yet), "before-rename" (the marker's temporary file written, not renamed).
TEST_PAUSE = "KDKERNELS_CHECKPOINT_TEST_PAUSE"


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (FSDP2 DTensor shards gathered; collective under FSDP)."""
    out = {}
    for name, t in model.state_dict().items():
        out[name] = t.full_tensor() if hasattr(t, "full_tensor") else t
    return out


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _test_pause(point: str, step: int) -> None:
    if os.environ.get(TEST_PAUSE) == f"{point}:{step}":
        print(f"kdkernels checkpoint test pause: {point}:{step}", file=sys.stderr, flush=True)
        time.sleep(3600)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(ckpt_dir: Path, student: nn.Module, tokenizer, optimizer, scheduler, *, step: int,
         fingerprint: dict[str, Any], rank: int = 0, extra: dict | None = None,
         barrier: Callable[[], None] | None = None) -> Path:
    """Every rank calls this (the state-dict gather is collective under FSDP); rank 0 writes
    the model, each rank its own optimizer shard and RNG state. ``barrier`` (the world's)
    holds rank 0's marker until every rank's files are on disk."""
    state = full_state_dict(student)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        student.save_pretrained(str(ckpt_dir), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(ckpt_dir))
        torch.save({"step": step, "scheduler": scheduler.state_dict(),
                    "fingerprint": fingerprint, "extra": extra or {}}, ckpt_dir / STATE)
    own = ckpt_dir / f"rank{rank}.pt"
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, own)
    # durable before the marker names them (a power cut must not leave it naming holes)
    mine = [own] + ([p for p in ckpt_dir.iterdir() if p.is_file()
                     and not p.name.startswith("rank")] if rank == 0 else [])
    for p in mine:
        _fsync(p)
    if barrier is not None:
        barrier()
    if rank == 0:
        fsync_dir(ckpt_dir)
        _test_pause("before-marker", step)
        _write_marker(ckpt_dir.parent, ckpt_dir.name, step)
    return ckpt_dir


def _write_marker(checkpoints: Path, name: str, step: int) -> None:
    """Replace checkpoints/latest atomically (not atomic_write_bytes: a test pauses between
    the temporary file and its rename); leftovers of a killed save go first."""
    marker = checkpoints / MARKER
    for stale in checkpoints.glob(f"{MARKER}{TMP_MARK}*"):
        stale.unlink()
    tmp = checkpoints / f"{MARKER}{TMP_MARK}{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    _test_pause("before-rename", step)
    os.replace(tmp, marker)
    fsync_dir(checkpoints)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint under run_dir/checkpoints, or run_dir itself if it is
    a checkpoint."""
    if (run_dir / STATE).exists():
        return run_dir
    marker = run_dir / "checkpoints" / MARKER
    if marker.exists():
        return run_dir / "checkpoints" / marker.read_text().strip()
    return None


def check_fingerprint(ckpt_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The saved trainer state, after refusing a checkpoint written by another config."""
    state = torch.load(ckpt_dir / STATE, weights_only=False)
    saved = saved_fingerprint(state["fingerprint"], fingerprint)
    diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"--resume {ckpt_dir} was written by a different configuration "
                         f"({pretty}); resume with the same options or start a new --output")
    return state


def load_model_weights(ckpt_dir: Path, student: nn.Module) -> None:
    """Copy the checkpoint's weights into an existing (unwrapped) student."""
    from safetensors.torch import load_file

    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"--resume {ckpt_dir} holds no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")
            and getattr(student.config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"--resume {ckpt_dir}: weights do not match the model (missing "
                         f"{sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")


def load_rank_state(ckpt_dir: Path, rank: int, optimizer) -> None:
    path = ckpt_dir / f"rank{rank}.pt"
    if not path.exists():
        raise ValueError(f"--resume {ckpt_dir} has no state for rank {rank}: resume with the "
                         "number of processes that wrote it")
    state = torch.load(path, weights_only=False)  # our own file: holds numpy RNG state
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])


def write_json(path: Path, obj: Any) -> None:
    """A run's JSON file (run.json, results.json...), replaced atomically: a kill leaves the
    old file or the new one, never a torn one that a --resume could not read."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())
