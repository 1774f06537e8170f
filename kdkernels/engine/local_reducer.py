"""Where per-row partial statistics meet: a single process, or ranks holding vocab shards.

The chunk driver talks to a ``Reducer`` only; vocab parallelism plugs in here
(``parallel/reducer.py``), not per backend.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Reducer(Protocol):
    """What the chunk driver needs from the place its row statistics are merged."""

    vocab_start: int  # first global vocabulary row of the local logits

    def chunk_width(self, local_width: int) -> int:
        """The logit columns per row that chunks are planned for (the same on every rank)."""
        ...

    def merge_stats(self, partial: torch.Tensor) -> torch.Tensor:
        """[C, len(STATS)] partials of the local columns -> the merged full-row stats."""
        ...

    def sum_rows(self, partial: torch.Tensor) -> torch.Tensor:
        """[C, len(MIX)] plain sums of the local columns -> the full-row sums."""
        ...

    def merge_student(self, partial: torch.Tensor) -> torch.Tensor:
        """[C, len(SSTATS) + extra] student-only partials plus plain-sum columns (sparse
        teachers: the gathered logits) -> merged, in one collective."""
        ...

    def finish_grad_hidden(self, grad: torch.Tensor) -> torch.Tensor:
        """The local contribution to grad_hidden -> the full gradient."""
        ...

    def raise_together(self, error: Exception | None) -> None:
        """Raise ``error`` (an input check that failed here, or None) on every participant
        together if any of them failed, so that none waits in a collective."""
        ...


class LocalReducer:
    """The whole (shared) vocabulary lives in this process: every merge is the identity."""

    vocab_start = 0

    def chunk_width(self, local_width: int) -> int:
        return local_width

    def merge_stats(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    def sum_rows(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    def merge_student(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    def finish_grad_hidden(self, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def raise_together(self, error: Exception | None) -> None:
        if error is not None:
            raise error


LOCAL: Reducer = LocalReducer()
