"""The `cpp` backend: the row ops as OpenMP + at::vec C++ on CPU tensors (csrc/rows_cpu.cpp).

Importing it builds the CPU extension on first use (kdkernels/_build.py) and raises
ImportError with the reason when it cannot be built or loaded.
"""

from __future__ import annotations

import torch

from .. import _build
from . import _ext_rows
from .base import Backend, RowSpec

_build.load_cpu()


def not_supported_reasons(device: torch.device, dtype: torch.dtype, spec: RowSpec) -> list[str]:
    why = _ext_rows.dtype_reasons("cpp", dtype)
    if device.type != "cpu":
        why.append(f"cpp backend runs on CPU tensors, got {device}")
    return why


BACKEND = Backend(
    name="cpp",
    stats=_ext_rows.stats,
    mix=_ext_rows.mix,
    grad=_ext_rows.grad,
    not_supported_reasons=not_supported_reasons,
    workspace_bytes_per_logit=_ext_rows.workspace_bytes_per_logit,
)
