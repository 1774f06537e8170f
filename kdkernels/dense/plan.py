"""The plan of one dense-loss call: what its Functions and rows need besides tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.base import Backend, RowSpec
from ..engine.local_reducer import Reducer
from ..options import KDOptions


@dataclass(frozen=True)
class Plan:
    """Everything the Functions need besides tensors."""

    opts: KDOptions
    spec: RowSpec
    backend: Backend
    reducer: Reducer
    compute_dtype_s: torch.dtype
    compute_dtype_t: torch.dtype
    label_vocab: int  # labels must be ids in [0, label_vocab) (the global shared vocabulary)
