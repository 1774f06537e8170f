"""Build (first use) and load the C++ row math of the fused ULD loss (csrc/uld_cpu.cpp).

A small library of its own (``extension.load_cpu_library``: the CPU extension's flags, cache
and ``KDKERNELS_NO_BUILD`` rule, its own source hash), so that it neither rebuilds nor waits
for the row-op extension. Its ops:
``torch.ops.kdkernels_uld.sorted_l1`` and ``torch.ops.kdkernels_uld.hybrid``.
"""

from __future__ import annotations

from ..backends import extension

SOURCE = "uld_cpu.cpp"


def load() -> None:
    """Load the library (building it once); raise ``ImportError`` saying why it cannot."""
    extension.load_cpu_library("ULD C++", SOURCE)
