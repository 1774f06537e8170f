"""Training batches whose teacher targets come from a server (`kdk distill --teacher-url`).

The windows are the ones the in-process run reads (windows.train_batch / streams.train_batch:
a pure function of seed, step, micro-batch and rank), and the server is asked for each
window's targets: the top-K ids and log-probs (top-k mode) or the final hidden states (hidden
mode). The request of the next micro-batch is in flight while the current one trains
(prefetch.Prefetcher), and --resume needs no loader state: a batch does not depend on the
ones asked for before it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import streams, windows
from .prefetch import Prefetcher

Key = tuple[int, int, int, int]  # (seed, step, micro, rank)


class ServedBatches:
    """train_batch(...) -> {"input_ids", ["labels"], and the targets' tensors}.

    ``targets(input_ids [B, S]) -> dict of tensors`` asks the server (any exception it raises
    reaches the loop from train_batch, with ``failed_step`` set); ``steps`` and ``grad_accum``
    bound the prefetch to the run's micro-batches.
    """

    def __init__(self, tokens: torch.Tensor | streams.TokenStream,
                 targets: Callable[[torch.Tensor], dict[str, torch.Tensor]], *,
                 batch_size: int, seq_len: int, steps: int, grad_accum: int = 1) -> None:
        self.tokens = tokens  # what a student without the teacher (CE only) trains on
        self._targets = targets
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.steps = steps
        self.grad_accum = grad_accum
        self.failed_step: int | None = None
        self._prefetch: Prefetcher | None = None
        self._closed = {"wait_s": 0.0, "fetch_s": 0.0, "fetches": 0, "prefetched": 0}

    def _following(self, key: Key) -> Key | None:
        seed, step, micro, rank = key
        if micro + 1 < self.grad_accum:
            return seed, step, micro + 1, rank
        return (seed, step + 1, 0, rank) if step + 1 < self.steps else None

    def fetch(self, key: Key) -> dict[str, torch.Tensor]:
        """The batch of ``key`` with its targets, without prefetch."""
        seed, step, micro, rank = key
        if isinstance(self.tokens, streams.TokenStream):
            b = streams.train_batch(self.tokens, self.batch_size, self.seq_len, seed=seed,
                                    step=step, micro=micro, rank=rank)
        else:
            b = {"input_ids": windows.train_batch(self.tokens, self.batch_size, self.seq_len,
                                                  seed=seed, step=step, micro=micro,
                                                  rank=rank)}
        return {**b, **self._targets(b["input_ids"])}

    def train_batch(self, batch_size: int, seq_len: int, *, seed: int, step: int, micro: int = 0,
                    rank: int = 0, grad_accum: int = 1,
                    world_size: int = 1) -> dict[str, torch.Tensor]:
        """The loop's call (CacheData's signature); the run's shape is fixed at construction."""
        if (batch_size, seq_len, grad_accum) != (self.batch_size, self.seq_len,
                                                 self.grad_accum):
            raise ValueError(f"served batches were set up for batch {self.batch_size}, "
                             f"seq_len {self.seq_len}, grad_accum {self.grad_accum}; asked for "
                             f"{batch_size}, {seq_len}, {grad_accum}")
        if self._prefetch is None:
            self._prefetch = Prefetcher(self.fetch, self._following)
        try:
            return self._prefetch.get((seed, step, micro, rank))
        except BaseException:
            self.failed_step = step
            raise

    def timing(self) -> dict[str, Any]:
        """Seconds blocked on the teacher (wait_s), seconds its requests took (fetch_s),
        requests made and how many were already in flight when needed."""
        p = self._prefetch
        if p is None:
            return dict(self._closed)
        return {k: self._closed[k] + getattr(p, k) for k in self._closed}

    def close(self) -> None:
        """Stop the prefetch thread (its totals kept); a later train_batch starts another."""
        if self._prefetch is not None:
            self._closed = self.timing()
            self._prefetch.close()
            self._prefetch = None
