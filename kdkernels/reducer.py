"""Where per-row partial statistics meet: a single process, or ranks holding vocab shards.

The chunk driver talks to a reducer only; vocab parallelism plugs in here, not per backend.
"""

from __future__ import annotations

import torch


class LocalReducer:
    """The whole (shared) vocabulary lives in this process: every merge is the identity."""

    vocab_start = 0

    def merge_stats(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    def sum_rows(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    def finish_grad_hidden(self, grad: torch.Tensor) -> torch.Tensor:
        return grad


LOCAL = LocalReducer()
