"""Deterministic token windows drawn from a token stream: training batches are a pure
function of (seed, step, micro-batch, rank), so resuming needs no data-loader state to be
bit-for-bit; held-out windows are fixed and evenly spread, the same for every model."""

from __future__ import annotations

import zlib

import torch


def _generator(*key: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


def train_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, *, seed: int, step: int,
                micro: int = 0, rank: int = 0) -> torch.Tensor:
    """[batch_size, seq_len] windows at random offsets, a function of its arguments only."""
    starts = window_starts(tokens.numel(), batch_size, seq_len, seed=seed, step=step,
                           micro=micro, rank=rank)
    return torch.stack([tokens[s:s + seq_len] for s in starts])


def window_starts(n_tokens: int, batch_size: int, seq_len: int, *, seed: int, step: int,
                  micro: int = 0, rank: int = 0) -> list[int]:
    """The offsets of train_batch's windows (shared by masked streams, see streams.py)."""
    if n_tokens <= seq_len:
        raise ValueError(f"the training split has {n_tokens} tokens, fewer than "
                         f"--seq-len {seq_len} + 1; use a larger corpus or a shorter --seq-len")
    g = _generator(seed, step, micro, rank)
    return torch.randint(0, n_tokens - seq_len, (batch_size,), generator=g).tolist()


def eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int,
                 n_batches: int) -> list[torch.Tensor]:
    """Fixed, evenly spread windows of the held-out split (the same for every model)."""
    starts = eval_starts(tokens.numel(), batch_size, seq_len, n_batches)
    windows = torch.stack([tokens[s:s + seq_len] for s in starts])
    return list(windows.split(batch_size))


def eval_starts(n_tokens: int, batch_size: int, seq_len: int, n_batches: int) -> list[int]:
    """The offsets of eval_batches' windows."""
    n_windows = min(batch_size * n_batches, n_tokens // seq_len)
    if n_windows < 1:
        raise ValueError(f"the held-out split has {n_tokens} tokens, fewer than "
                         f"--seq-len {seq_len}; use a larger corpus or a shorter --seq-len")
    stride = (n_tokens - seq_len) // max(n_windows - 1, 1)
    return [i * stride for i in range(n_windows)]
