"""CPU thread count for training on a shared machine.

PyTorch's OpenMP workers spin at every barrier. When other processes already keep the cores
busy, a worker that loses its core stalls the others: measured on a 2-core machine at load
average 4-8, a training step took 3-5x longer with 2 threads than with 1. So the automatic
choice leaves out the cores that the load average says are taken.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose(requested: int, world_size: int = 1) -> int:
    """``requested`` if positive, else the cores per rank not already busy (at least 1)."""
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0 = automatic); got {requested}")
    if requested:
        return requested
    cores = max(1, available_cores() // max(1, world_size))
    try:
        busy = os.getloadavg()[0] / max(1, world_size)
    except OSError:
        busy = 0.0
    return max(1, min(cores, cores - int(busy)))
