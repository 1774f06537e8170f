"""The embedded default's top-k cache: its teacher's top-K log-probs over exactly the windows
the dense-KD student trains on, in the same order, so the top-k student sees the same steps
and batches and differs from the dense one only in what it is told about the teacher.

It is written into the run directory with the cache package (teacher.score, CacheWriter) in
the format of `kdk cache-teacher`, timed, and reused on --resume when its data is unchanged.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ...hf import models
from ..batches import windows
from ..batches.cache_data import CacheData
from ..config import TrainConfig
from ..runtime import checkpoint, distributed

DTYPE = "bf16"  # what `kdk cache-teacher` writes by default: 4 + 6 K bytes per token
SCORE_BATCH = 16  # sequences per teacher forward


def dense_windows(cfg: TrainConfig, train_ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every window the dense student reads, in CacheData's sequential order: micro-batch
    g = (step * grad_accum + micro) * world + rank."""
    return torch.cat([windows.train_batch(train_ids, cfg.batch_size, cfg.seq_len,
                                          seed=cfg.seed, step=s, micro=m, rank=r)
                      for s in range(cfg.max_steps) for m in range(cfg.grad_accum)
                      for r in range(world_size)])


def _settings(cfg: TrainConfig, teacher, tok, seqs: torch.Tensor, world_size: int) -> dict:
    from ...cache.hashing import config_hash, tokenizer_hash, tokens_hash
    from ...cache.writer import settings_from_meta

    meta = {"teacher": "default", "teacher_config_hash": config_hash(teacher.config),
            "tokenizer_hash": tokenizer_hash(tok),
            "vocab_size": int(models.head(teacher)[0].shape[0]), "mode": "topk",
            "seed": cfg.seed, "dtype": DTYPE,
            "data": f"kdk distill batches: seed {cfg.seed}, {cfg.max_steps} steps x "
                    f"{cfg.grad_accum} micro x {world_size} ranks x {cfg.batch_size} windows"}
    settings = settings_from_meta(meta, seq_len=cfg.seq_len, top_k=cfg.cache_top_k,
                                  shard_size=1024)
    settings.update(data_hash=tokens_hash(seqs), expected_sequences=int(seqs.shape[0]))
    return settings


def _write(directory: Path, settings: dict, teacher, seqs: torch.Tensor, k: int,
           device: torch.device) -> float | None:
    """Write (or finish) the cache; returns the mean teacher mass its K ids cover over the
    rows written now (None when nothing was left to write)."""
    from ...cache import scoring
    from ...cache.writer import CacheWriter

    manifest = directory / "manifest.json"
    if manifest.exists():  # e.g. --resume with more --max-steps: other windows, rewrite
        old = json.loads(manifest.read_text())
        if any(old.get(key) != value for key, value in settings.items()):
            shutil.rmtree(directory)
    writer = CacheWriter(directory, settings)
    head = scoring.Head.of(teacher)
    n, shard = seqs.shape[0], settings["shard_size"]
    mass, rows = 0.0, 0
    for start in range(writer.done_sequences, n, shard):  # resumable shard by shard
        stop = min(start + shard, n)
        parts = [scoring.score(teacher, head, seqs[b:min(b + SCORE_BATCH, stop)], mode="topk",
                               k=k, samples=1, seed=0, first_index=b, device=device)
                 for b in range(start, stop, SCORE_BATCH)]
        lps = torch.cat([p[1] for p in parts])
        mass += float(lps.double().exp().sum())
        rows += lps.shape[0] * lps.shape[1]
        writer.add_shard(seqs[start:stop], torch.cat([p[0] for p in parts]), lps, checked=True)
    writer.finish()
    return mass / rows if rows else None


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def build(cfg: TrainConfig, teacher, tok, train_ids: torch.Tensor, out: Path,
          world: distributed.World) -> tuple[CacheData, dict[str, Any]]:
    """The cache under out/topk-cache (rank 0 writes it), as sequential CacheData, and its
    facts for the report: K, dtype, tokens, bytes on disk and per token, write seconds."""
    directory, info_path = out / "topk-cache", out / "topk-cache.json"
    if world.is_main:
        t0 = time.perf_counter()
        seqs = dense_windows(cfg, train_ids, world.size)
        settings = _settings(cfg, teacher, tok, seqs, world.size)
        done = (directory / "manifest.json").exists() and info_path.exists() and all(
            json.loads((directory / "manifest.json").read_text()).get(key) == value
            for key, value in {**settings, "complete": True}.items())
        if not done:
            covered = _write(directory, settings, teacher, seqs, cfg.cache_top_k, world.device)
            tokens = int(seqs.numel())
            size = disk_bytes(directory)
            info = {"top_k": cfg.cache_top_k, "dtype": DTYPE, "sequences": int(seqs.shape[0]),
                    "tokens": tokens, "bytes": size, "bytes_per_token": size / tokens,
                    "write_s": time.perf_counter() - t0, "covered_mass": covered,
                    "dir": str(directory)}
            checkpoint.write_json(info_path, info)  # atomic: a resume reads it whole
    world.barrier()
    info = json.loads(info_path.read_text())
    return CacheData.open(directory, order="sequential", verify=True), info
