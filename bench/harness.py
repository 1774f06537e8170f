"""Worker processes for the CPU benchmarks: one process per measurement, watched for memory.

A worker is a benchmark script run again with ``--worker ... --result FILE``: it measures one
thing and writes a JSON result. Its peak RSS is its own (``getrusage`` max RSS), so providers
never share a high-water mark. The parent polls the worker's RSS and the machine's
MemAvailable and kills it past a limit (reported ``OOM``, as is a SIGKILL from the kernel),
or past a timeout; a worker that dies without a result is a ``crash``. Rounds alternate the
order of what they run, so that a shared machine's drift hits every provider alike.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def proc_mib(path: str, key: str) -> float | None:
    """A 'Key:  <n> kB' field of a /proc file, in MiB (None if unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mib(pid: int | str = "self") -> float | None:
    return proc_mib(f"/proc/{pid}/status", "VmRSS")


def mem_available_mib() -> float | None:
    return proc_mib("/proc/meminfo", "MemAvailable")


def is_oom(err: BaseException) -> bool:
    """An allocation failure (host or CUDA), as opposed to a bug."""
    return isinstance(err, MemoryError) or any(w in str(err).lower() for w in _OOM_WORDS)


def machine() -> str:
    """CPU model, torch's CPU capability (AVX2, AVX512, ...), cores and torch version: the
    numbers depend on all of them (bf16 GEMMs are fast only with AVX512-BF16/AMX)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, "
            f"torch {torch.__version__}")


def round_order(names: Sequence[str], rnd: int) -> list[str]:
    """Even rounds run ``names`` in order, odd rounds reversed."""
    return list(names) if rnd % 2 == 0 else list(reversed(names))


def time_calls(run: Callable[[], object], reset: Callable[[], None], repeats: int,
               warmup: int) -> tuple[list[float], object]:
    """(ms of each timed call, the last call's output). ``reset`` (clearing gradients) and a
    garbage collection run before every call, outside the timer."""
    for _ in range(warmup):  # includes torch.compile's compilation
        reset()
        run()
    times, out = [], None
    for _ in range(repeats):
        reset()
        gc.collect()
        t0 = time.perf_counter()
        out = run()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, out


# ----------------------------------------------------------------------------- worker side


def worker_main(measure: Callable[[], dict], result_path: str, threads: int | None) -> int:
    """Run ``measure`` in this worker process and write its result (status, the process's
    peak RSS) to ``result_path``; an exception is a result too (``OOM`` or ``error``)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        result = {"status": "ok", **measure()}
    except Exception as err:
        traceback.print_exc()
        result = {"status": "OOM" if is_oom(err) else "error",
                  "error": f"{type(err).__name__}: {err}"}
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(result))
    return 0 if result["status"] == "ok" else 1


# ----------------------------------------------------------------------------- parent side


@dataclass
class Limits:
    mem_mib: float  # the watchdog kills a worker whose RSS exceeds this
    min_available_mib: float  # ... or when the machine's MemAvailable falls below this
    timeout_s: float


def worker_env(threads: int | None) -> dict[str, str]:
    """Environment for a worker process: thread count, and torch.compile without a pool of
    compile subprocesses (their memory would blur the worker's own peak)."""
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def classify_exit(rc: int, killed: str = "") -> dict:
    """A worker that left no result: killed by the watchdog, by the kernel, or crashed."""
    if killed:
        return {"status": "timeout" if killed.startswith("timeout") else "OOM", "error": killed}
    if rc == -signal.SIGKILL:
        return {"status": "OOM", "error": "SIGKILL (the kernel's out-of-memory killer?)"}
    if rc < 0:
        return {"status": "crash", "error": f"killed by {signal.Signals(-rc).name}"}
    return {"status": "crash", "error": f"exit code {rc} without a result"}


def spawn_worker(argv: list[str], limits: Limits, threads: int | None = None
                 ) -> tuple[dict, int, float]:
    """Run ``python *argv --result FILE`` under the memory watchdog; returns (its JSON
    result, or a synthesized one for a killed / crashed worker; exit code; max RSS MiB seen
    by wait4). The worker's stdout goes to this process's stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen([sys.executable, *argv, "--result", str(out)], stdout=2,
                                env=worker_env(threads))
        killed, deadline, pid = "", time.monotonic() + limits.timeout_s, 0
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                rss, avail = rss_mib(proc.pid), mem_available_mib()
                if not killed and rss is not None and rss > limits.mem_mib:
                    killed = f"OOM: RSS {rss:.0f} MiB > limit {limits.mem_mib:.0f} MiB, killed"
                elif not killed and avail is not None and avail < limits.min_available_mib:
                    killed = (f"OOM: machine MemAvailable {avail:.0f} MiB < "
                              f"{limits.min_available_mib:.0f} MiB, killed")
                elif not killed and time.monotonic() > deadline:
                    killed = f"timeout after {limits.timeout_s:.0f} s, killed"
                if killed:
                    proc.send_signal(signal.SIGKILL)
                time.sleep(0.05)
        finally:
            if not pid:  # the parent is being interrupted: never leave a worker behind
                proc.kill()
                os.waitpid(proc.pid, 0)
                proc.returncode = -signal.SIGKILL
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc
        wait_peak = usage.ru_maxrss / 1024
        result = json.loads(out.read_text()) if out.exists() else None
    if result is None:
        result = classify_exit(rc, killed)
    return result, rc, wait_peak
