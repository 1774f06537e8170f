"""A row backend that does no row work, for the benchmarks' GEMM floor (bench only: the
library never uses it, so it lives here rather than in kdkernels.backends).

``null_like(backend)`` plans chunks exactly as ``backend`` does (same workspace bytes per
logit, same packed-gradient rule) but its row ops only return empty statistics and leave
dL/dz as the chunk's buffer holds it: the chunk driver then runs its GEMMs, gathers and
bookkeeping alone, so "the floor" is the real driver minus the row ops, not a copy of it.
Its row ops record the chunking they are handed (``Seen``), so the benchmarks read the
driver's plan from the driver's own calls rather than from its internal planner's signature.
"""

from __future__ import annotations

import dataclasses

import torch

from kdkernels.backends.base import Backend
from kdkernels.layouts import MIX, STATS


@dataclasses.dataclass
class Seen:
    """What the driver handed the row ops: the largest chunk, the logits' dtype, and where
    dL/dz went (kdkernels.engine.chunking.DZ_LAYOUTS: over the logits in place, packed into
    their storage, or a buffer of its own)."""
    rows: int = 0
    logits_dtype: torch.dtype | None = None
    dz_layout: str = ""


def null_like(backend: Backend, seen: Seen | None = None) -> Backend:
    """``backend``'s chunk planning with no row work (its name prefixed with "null:"),
    recording into ``seen`` what its row ops are handed."""
    seen = seen if seen is not None else Seen()

    def stats(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, spec) -> torch.Tensor:
        seen.rows, seen.logits_dtype = max(seen.rows, zs.shape[0]), zs.dtype
        return torch.zeros(zs.shape[0], len(STATS), dtype=torch.float32, device=zs.device)

    def mix(zs: torch.Tensor, zt: torch.Tensor, norms: torch.Tensor, spec) -> torch.Tensor:
        return torch.zeros(zs.shape[0], len(MIX), dtype=torch.float32, device=zs.device)

    def grad(zs, zt, labels, coef, spec, out) -> None:
        if out.data_ptr() == zs.data_ptr() and out.dtype == zs.dtype:
            seen.dz_layout = "in_place"
        elif out.untyped_storage().data_ptr() == zs.untyped_storage().data_ptr():
            seen.dz_layout = "packed"
        else:
            seen.dz_layout = "own"

    return dataclasses.replace(backend, name=f"null:{backend.name}", stats=stats, mix=mix,
                               grad=grad)
