"""The `cuda` backend: the row ops as CUDA C++ kernels (csrc/rows_cuda.cu).

Importing it builds the CUDA extension on first use (kdkernels/_build.py; needs a CUDA device,
a CUDA build of torch and a toolkit) and raises ImportError with the reason when it cannot.
"""

from __future__ import annotations

import torch

from . import _ext_rows
from . import extension as _build

if not torch.cuda.is_available():
    # Building CUDA code that cannot run here would only cost minutes; tests and
    # `python -m kdkernels.info` build it explicitly to check that it compiles.
    raise ImportError("no CUDA device is available (torch.cuda.is_available() is False)")
_build.load_cuda()


BACKEND = _ext_rows.backend("cuda", "cuda")
