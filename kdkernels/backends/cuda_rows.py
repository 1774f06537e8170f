"""The `cuda` backend: the row ops as CUDA C++ kernels (csrc/rows_cuda.cu).

Importing it builds the CUDA extension on first use (kdkernels/_build.py; needs a CUDA device,
a CUDA build of torch and a toolkit) and raises ImportError with the reason when it cannot.
"""

from __future__ import annotations

import torch

from .. import _build
from . import _ext_rows
from .base import Backend, RowSpec

if not torch.cuda.is_available():
    # Building CUDA code that cannot run here would only cost minutes; tests and
    # `python -m kdkernels.info` build it explicitly to check that it compiles.
    raise ImportError("no CUDA device is available (torch.cuda.is_available() is False)")
_build.load_cuda()


def not_supported_reasons(device: torch.device, dtype: torch.dtype, spec: RowSpec) -> list[str]:
    why = _ext_rows.dtype_reasons("cuda", dtype)
    if device.type != "cuda":
        why.append(f"cuda backend runs on CUDA tensors, got {device}")
    return why


BACKEND = Backend(
    name="cuda",
    stats=_ext_rows.stats,
    mix=_ext_rows.mix,
    grad=_ext_rows.grad,
    not_supported_reasons=not_supported_reasons,
    workspace_bytes_per_logit=_ext_rows.workspace_bytes_per_logit,
)
