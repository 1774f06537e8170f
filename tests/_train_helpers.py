"""Tiny models and data shared by the trainer tests."""

from __future__ import annotations

import torch

from kdkernels.train.config import ModelSize, TrainConfig
from kdkernels.train.models import build_llama

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
