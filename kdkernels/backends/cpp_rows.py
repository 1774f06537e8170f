"""The `cpp` backend: the row ops as OpenMP + at::vec C++ on CPU tensors (csrc/rows_cpu.cpp).

Importing it builds the CPU extension on first use (kdkernels/_build.py) and raises
ImportError with the reason when it cannot be built or loaded.
"""

from __future__ import annotations

from . import _ext_rows
from . import extension as _build

_build.load_cpu()


BACKEND = _ext_rows.backend("cpp", "cpu")
