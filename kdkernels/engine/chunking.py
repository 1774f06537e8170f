"""The chunk planner: how many token rows each chunk takes and where dL/dz goes.

One formula for every caller (the chunk driver, vocab-parallel ranks, the benchmarks' GEMM
floor), called once per loss call. A chunk holds [C, V] student and teacher logits (the
backend's ``workspace_bytes_per_logit`` covers them and its temporaries), possibly a [C, V]
dL/dz buffer, and per-row staging for gathered hidden rows; the planner takes the fewest
chunks that fit the budget and balances them so that the last is not a small remainder.
Fewer chunks matter: every chunk re-reads and re-writes the fp32 grad_weight accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.base import Backend

# Where dL/dz goes: over the student logits (same dtype), packed as 16-bit values over the
# first half of each fp32 logit row (backends/base.py), or in a [C, V] buffer of its own.
DZ_LAYOUTS = ("in_place", "packed", "own")


@dataclass(frozen=True)
class ChunkPlan:
    rows: int  # token rows per chunk (>= 1)
    dz_layout: str  # one of DZ_LAYOUTS

    def starts(self, n_rows: int) -> range:
        return range(0, n_rows, self.rows)


def balanced_rows(n_rows: int, most: int) -> int:
    """Rows per chunk for the fewest chunks of at most ``most`` rows, balanced."""
    most = max(1, min(n_rows, most)) if n_rows else max(1, most)
    n_chunks = -(-n_rows // most)
    return -(-n_rows // n_chunks) if n_rows else most


def rows_for_budget(budget: int, width: int, bytes_per_logit: int,
                    bytes_per_row: int = 0) -> int:
    """The most rows whose [rows, width] workspace (plus per-row staging) fits ``budget``."""
    return max(1, budget // max(1, width * bytes_per_logit + bytes_per_row))


def plan_chunks(*, n_rows: int, width: int, backend: Backend, logits_dtype: torch.dtype,
                grad_dtype: torch.dtype | None, device: torch.device, budget: int,
                chunk_size: int | None = None, bytes_per_row: int = 0,
                student_only: bool = False) -> ChunkPlan:
    """The chunking of one loss call.

    ``width``: logit columns per row that every participant plans for (a vocab-parallel
    group passes its widest shard, so all ranks cut the same chunks). ``grad_dtype``: the
    dtype of dL/dz (the student's compute dtype), None when no gradient is computed.
    ``bytes_per_row``: staging per row besides the [C, V] buffers. ``student_only``: no
    teacher logits (sparse teachers), one [C, V] input fewer. An explicit ``chunk_size``
    wins over the budget.
    """
    base = backend.workspace_bytes_per_logit(logits_dtype, device.type)
    if student_only:
        base -= logits_dtype.itemsize

    def rows(extra_per_logit: int = 0) -> int:
        if chunk_size is not None:
            return max(1, min(chunk_size, n_rows))
        return balanced_rows(n_rows, rows_for_budget(budget, width, base + extra_per_logit,
                                                     bytes_per_row))

    if grad_dtype is None or grad_dtype == logits_dtype:
        return ChunkPlan(rows(), "in_place")
    if logits_dtype == torch.float32 and grad_dtype.itemsize == 2:
        least = backend.packed_grad_min_rows(device)
        c = rows()
        if least is not None and c >= least:
            return ChunkPlan(c, "packed")
    return ChunkPlan(rows(grad_dtype.itemsize), "own")
