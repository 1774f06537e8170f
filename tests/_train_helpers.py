"""Tiny models and data shared by the trainer tests."""

from __future__ import annotations

import torch

from kdkernels.train.config import ModelSize, TrainConfig
from kdkernels.train.sources.tiny_llama import build_llama

VOCAB = 97  # prime, so no power-of-two tiling hides a bug


def tiny_pair(vocab: int = VOCAB, seq: int = 16):
    torch.manual_seed(1)
    teacher = build_llama(ModelSize(48, 2, 2, 96), vocab, seq)
    student = build_llama(ModelSize(32, 1, 2, 64), vocab, seq)
    return student, teacher


def token_stream(n: int = 4000, vocab: int = VOCAB, seed: int = 3) -> torch.Tensor:
    """Not uniform noise: a repeating pattern with noise, so the models can learn a bit."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % 11 * 7 % vocab
    noise = torch.randint(0, vocab, (n,), generator=g)
    pick = torch.rand(n, generator=g) < 0.3
    return torch.where(pick, noise, base)


def tiny_config(tmp_path, **kw) -> TrainConfig:
    base = dict(max_steps=4, warmup_steps=1, batch_size=2, seq_len=16, eval_every=0,
                eval_batches=1, progress=False, output=str(tmp_path), lr=1e-2,
                temperature=2.0, kd_weight=0.5, ce_weight=0.5)
    return TrainConfig(**{**base, **kw})


def spawn_gloo(worker, nprocs: int, *args) -> None:
    """Run worker(rank, nprocs, port, *args) in nprocs processes on a free local port; the
    worker joins with join_gloo."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(nprocs, port, *args), nprocs=nprocs, join=True)


def join_gloo(rank: int, world_size: int, port: int):
    """Inside a spawned worker: the torchrun environment, one CPU thread, the trainer's
    World (gloo)."""
    import os

    from kdkernels.train.runtime import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    return distributed.init("cpu")
