"""The plan of one top-k-loss call: what its Functions and rows need besides tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.base import Backend, RowSpec
from ..engine.local_reducer import Reducer
from .options import TopKOptions


@dataclass(frozen=True)
class SparsePlan:
    """Everything the Functions need besides tensors."""

    opts: TopKOptions
    spec: RowSpec
    backend: Backend
    reducer: Reducer
    compute_dtype_s: torch.dtype  # the student's GEMMs' (there is no teacher GEMM)
    vocab: int  # teacher ids and labels must be in [0, vocab) (the global vocabulary)
