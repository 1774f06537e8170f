"""CPU thread count for training on a shared machine.

The default is every core the process may run on (``os.sched_getaffinity``). One exception,
measured: PyTorch's OpenMP workers spin at every barrier, so when other processes keep cores
busy a worker that loses its core stalls the others (on a 2-core machine with two other
CPU-bound jobs, a training step took 3-5x longer with 2 threads than with 1). So the
automatic choice leaves out the cores that OTHER processes are using *now*, measured from
/proc/stat over a short window at start. The 1-minute load average is not used: it still
counts a burst that ended seconds ago (a `pip install` just before the run halved the
thread count on an idle machine).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 1.5  # long enough to average a scheduler tick's noise, short next to any run


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies over all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [float(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])  # guest time is already in user


def busy_cores(window_s: float = WINDOW_S, *,
               read: Callable[[], tuple[float, float] | None] = cpu_times,
               sleep: Callable[[float], None] = time.sleep) -> float | None:
    """Cores kept busy by other processes over the next window_s seconds (this process
    sleeps meanwhile, so it counts none); None when the machine cannot tell."""
    before = read()
    sleep(window_s)
    after = read()
    if before is None or after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    return max(0.0, share) * (os.cpu_count() or 1)


@dataclass(frozen=True)
class Choice:
    threads: int
    reason: str  # one line for the log and the report


def choose(requested: int, world_size: int = 1, *,
           measure: Callable[[], float | None] = busy_cores) -> Choice:
    """``requested`` if positive; else every available core per rank, less the cores other
    processes kept busy during the measurement window (at least 1)."""
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0 = automatic); got {requested}")
    if requested:
        return Choice(requested, f"{requested} (--threads)")
    world = max(1, world_size)
    cores = max(1, available_cores() // world)
    busy = measure()
    if busy is None:
        return Choice(cores, f"{cores}: all available cores (load unknown)")
    # Ranks start together and sleep through the same window, so they never count each
    # other; a core counts as taken when other processes used more than half of it.
    taken = int(busy / world + 0.5)
    threads = max(1, cores - taken)
    if threads < cores:
        return Choice(threads, f"{threads} of {cores} available cores: other processes kept "
                               f"{busy:.1f} cores busy over {WINDOW_S:g} s at start (pass "
                               "--threads to override)")
    return Choice(threads, f"{threads}: all available cores")
