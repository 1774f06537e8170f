"""A row backend that does no row work, for the benchmarks' GEMM floor.

``null_like(backend)`` plans chunks exactly as ``backend`` does (same workspace bytes per
logit, same packed-gradient rule) but its row ops only return empty statistics and leave
dL/dz as the chunk's buffer holds it: the chunk driver then runs its GEMMs, gathers and
bookkeeping alone, so "the floor" is the real driver minus the row ops, not a copy of it.
"""

from __future__ import annotations

import dataclasses

import torch

from ..layouts import MIX, STATS
from .base import Backend


def _stats(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, spec) -> torch.Tensor:
    return torch.zeros(zs.shape[0], len(STATS), dtype=torch.float32, device=zs.device)


def _mix(zs: torch.Tensor, zt: torch.Tensor, norms: torch.Tensor, spec) -> torch.Tensor:
    return torch.zeros(zs.shape[0], len(MIX), dtype=torch.float32, device=zs.device)


def _grad(zs, zt, labels, coef, spec, out) -> None:
    return None


def null_like(backend: Backend) -> Backend:
    """``backend``'s chunk planning with no row work (its name prefixed with "null:")."""
    return dataclasses.replace(backend, name=f"null:{backend.name}", stats=_stats, mix=_mix,
                               grad=_grad)
