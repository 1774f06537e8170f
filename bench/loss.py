"""CPU benchmark of the fused-linear distillation loss, forward plus backward, side by side.

    python bench/bench_cpu.py --shape S1 --dtype bf16 --csv bench/results/cpu_S1.csv

Each provider runs in its own process (this file with --worker), so its peak RSS is its own
and an out-of-memory kill is reported as "OOM" rather than ending the benchmark. See
bench/README.md for what is timed and what each column means.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402

# Loose agreement bounds between providers (relative): they catch a different loss (another
# divergence, a missing normaliser), not rounding. bf16 logits carry ~2**-8 relative error.
LOSS_RTOL = {"bf16": 3e-2, "fp32": 1e-4}
GRAD_RTOL = {"bf16": 1e-1, "fp32": 1e-3}
CHECK_SHAPE = common.Shape(37, 1009, 24, 40)  # tiny, odd sizes: the cheap agreement check
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")


@dataclass
class Result:
    provider: str
    dtype: str
    shape: str
    status: str = "ok"  # ok | OOM | timeout | error | crash
    ms_median: float | None = None
    times_ms: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    base_mib: float | None = None  # RSS after imports and inputs, before the first call
    loss: float | None = None
    note: str = ""
    error: str = ""


# ----------------------------------------------------------------------------- worker side


def _proc_mib(path: str, key: str) -> float | None:
    """A 'Key:  <n> kB' field of a /proc file, in MiB (None if unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _rss_mib(pid: int | str = "self") -> float | None:
    return _proc_mib(f"/proc/{pid}/status", "VmRSS")


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or any(w in str(err).lower() for w in _OOM_WORDS)


def _time_provider(name: str, shape: common.Shape, dtype: str, repeats: int, warmup: int,
                   seed: int) -> dict:
    inputs = common.make_inputs(shape, common.DTYPES[dtype], "cpu", seed)
    base = _rss_mib()
    run = common.build_provider(name, inputs)
    note = ""
    if name == "floor":
        plan = common.floor_plan(inputs)
        note = f"chunk {plan.chunk} rows, as kdkernels impl={plan.mirrors}"
    for _ in range(warmup):  # includes torch.compile's compilation
        inputs.clear_grads()
        run(inputs)
    times, loss = [], None
    for _ in range(repeats):
        inputs.clear_grads()
        gc.collect()
        t0 = time.perf_counter()
        out = run(inputs)
        times.append((time.perf_counter() - t0) * 1e3)
        loss = None if out is None else float(out)
    return {"status": "ok", "times_ms": times, "loss": loss, "base_mib": base, "note": note}


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _check_providers(names: list[str], shape: common.Shape, dtype: str, seed: int) -> dict:
    """Loss and gradients of each provider against naive_loss in float64 on the same
    (rounded) inputs."""
    inputs = common.make_inputs(shape, common.DTYPES[dtype], "cpu", seed)
    ref_in = [t.detach().double() if t.is_floating_point() else t for t in inputs.tensors()]
    ref_in[0].requires_grad_(True)
    ref_in[1].requires_grad_(True)
    loss64 = common.naive_loss(*ref_in)
    loss64.backward()
    ref_loss = float(loss64.detach())
    out = {}
    for name in names:
        try:
            inputs.clear_grads()
            loss = common.build_provider(name, inputs)(inputs)
            errs = {"loss": abs(float(loss) - ref_loss) / abs(ref_loss),
                    "grad_h": _rel_err(inputs.student_hidden.grad, ref_in[0].grad),
                    "grad_w": _rel_err(inputs.student_weight.grad, ref_in[1].grad)}
            ok = errs["loss"] <= LOSS_RTOL[dtype] and max(errs["grad_h"], errs["grad_w"]) \
                <= GRAD_RTOL[dtype]
            out[name] = {"ok": ok, **errs}
        except Exception as err:  # reported per provider; the others still get checked
            out[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    return out


def worker_main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = common.parse_shape(args.shape)
    try:
        if args.worker == "check":
            checks = _check_providers(args.providers or [], shape, args.dtype, args.seed)
            result = {"status": "ok", "check": checks}
        else:
            result = _time_provider(args.worker, shape, args.dtype, args.repeats, args.warmup,
                                    args.seed)
    except Exception as err:
        traceback.print_exc()
        result = {"status": "OOM" if _is_oom(err) else "error",
                  "error": f"{type(err).__name__}: {err}"}
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(result))
    return 0 if result["status"] == "ok" else 1


# ----------------------------------------------------------------------------- parent side


@dataclass
class Limits:
    mem_mib: float  # the watchdog kills a worker whose RSS exceeds this
    min_available_mib: float  # ... or when the machine's MemAvailable falls below this
    timeout_s: float


def _mem_available_mib() -> float | None:
    return _proc_mib("/proc/meminfo", "MemAvailable")


def spawn_worker(worker: str, shape: common.Shape, dtype: str, limits: Limits, *,
                 repeats: int = 3, warmup: int = 1, threads: int | None = None, seed: int = 0,
                 providers: list[str] | None = None) -> tuple[dict, int, float]:
    """Run one worker under the memory watchdog; returns (its JSON result, or a synthesized
    one for a killed / crashed worker; exit code; max RSS MiB seen by wait4)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker,
               "--shape", str(shape), "--dtype", dtype, "--repeats", str(repeats),
               "--warmup", str(warmup), "--seed", str(seed), "--result", str(out)]
        if threads:
            cmd += ["--threads", str(threads)]
        if providers:
            cmd += ["--providers", *providers]
        proc = subprocess.Popen(cmd, stdout=2, env=common.env_for_threads(threads))
        killed, deadline, pid = "", time.monotonic() + limits.timeout_s, 0
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                rss, avail = _rss_mib(proc.pid), _mem_available_mib()
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


def classify_exit(rc: int, killed: str = "") -> dict:
    """A worker that left no result: killed by the watchdog, by the kernel, or crashed."""
    if killed:
        return {"status": "timeout" if killed.startswith("timeout") else "OOM", "error": killed}
    if rc == -signal.SIGKILL:
        return {"status": "OOM", "error": "SIGKILL (the kernel's out-of-memory killer?)"}
    if rc < 0:
        return {"status": "crash", "error": f"killed by {signal.Signals(-rc).name}"}
    return {"status": "crash", "error": f"exit code {rc} without a result"}


def run_provider(name: str, shape: common.Shape, dtype: str, limits: Limits, *,
                 repeats: int = 3, warmup: int = 1, threads: int | None = None,
                 seed: int = 0) -> Result:
    res, _rc, wait_peak = spawn_worker(name, shape, dtype, limits, repeats=repeats,
                                       warmup=warmup, threads=threads, seed=seed)
    out = Result(name, dtype, common.shape_name(shape), status=res["status"],
                 times_ms=res.get("times_ms", []), peak_mib=res.get("peak_mib") or wait_peak,
                 base_mib=res.get("base_mib"), loss=res.get("loss"), note=res.get("note", ""),
                 error=res.get("error", ""))
    if out.times_ms:
        out.ms_median = statistics.median(out.times_ms)
    return out


def loss_disagreements(results: list[Result], dtype: str) -> dict[str, str]:
    """Providers whose loss is off the median of all measured losses by more than the
    dtype's loose tolerance."""
    losses = {r.provider: r.loss for r in results if r.loss is not None}
    finite = [v for v in losses.values() if math.isfinite(v)]
    if len(losses) < 2:
        return {}
    if not finite:
        return {name: "non-finite loss" for name in losses}
    ref = statistics.median(finite)
    bad = {}
    for name, value in losses.items():
        if not math.isfinite(value) or abs(value - ref) > LOSS_RTOL[dtype] * max(1.0, abs(ref)):
            bad[name] = f"loss {value:.6g} vs median {ref:.6g} of all providers"
    return bad


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown_table(results: list[Result]) -> str:
    floors = {(r.dtype, r.shape): r for r in results if r.provider == "floor" and r.ms_median}
    lines = ["| provider | dtype | shape | ms (median) | peak MiB | x floor (time) "
             "| peak - floor MiB | loss | status |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        floor = floors.get((r.dtype, r.shape))
        ratio = r.ms_median / floor.ms_median if floor and r.ms_median else None
        dpeak = (r.peak_mib - floor.peak_mib if floor and r.peak_mib and floor.peak_mib
                 and r.status == "ok" else None)
        status = r.status + (f": {r.note}" if r.note else "")
        lines.append(f"| {r.provider} | {r.dtype} | {r.shape} | {_fmt(r.ms_median, '.0f')} | "
                     f"{_fmt(r.peak_mib, '.0f')} | {_fmt(ratio, '.2f')} | "
                     f"{_fmt(dpeak, '+.0f')} | {_fmt(r.loss, '.5f')} | {status} |")
    return "\n".join(lines)


CSV_FIELDS = ("provider", "dtype", "shape", "status", "ms_median", "times_ms", "peak_mib",
              "base_mib", "ratio_floor", "loss", "note", "error")


def write_csv(path: str | Path, results: list[Result]) -> None:
    floors = {(r.dtype, r.shape): r.ms_median for r in results if r.provider == "floor"}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            row = {k: v for k, v in asdict(r).items() if k in CSV_FIELDS}
            row["times_ms"] = " ".join(f"{t:.2f}" for t in r.times_ms)
            floor = floors.get((r.dtype, r.shape))
            row["ratio_floor"] = r.ms_median / floor if floor and r.ms_median else ""
            writer.writerow(row)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _select(requested: list[str] | None, available: list[str], skipped: dict[str, str]
            ) -> list[str]:
    if not requested:
        return available
    chosen = ["floor"]  # ratios need the floor of the same run
    for req in requested:
        names = ([n for n in available if n.startswith(common.KDK_PREFIX)]
                 if req == "kdkernels" else [req])
        for name in names:
            if name in skipped:
                _log(f"[bench] skipping {name}: {skipped[name]}")
            elif name not in available:
                raise SystemExit(f"--providers: unknown provider {name!r}; available here: "
                                 f"{', '.join(available)} (or 'kdkernels' for all its impls)")
            elif name not in chosen:
                chosen.append(name)
    return chosen


def run_benchmark(shape: common.Shape, dtypes: list[str], providers: list[str] | None,
                  limits: Limits, *, repeats: int = 3, warmup: int = 1,
                  threads: int | None = None, seed: int = 0, check: bool = True
                  ) -> tuple[list[Result], list[str]]:
    """Every provider x dtype, one worker process each; returns (results, problems)."""
    results, problems = [], []
    for dtype in dtypes:
        available, skipped = common.discover_providers("cpu", common.DTYPES[dtype])
        names = _select(providers, available, skipped)
        if not providers:
            for name, why in skipped.items():
                _log(f"[bench] skipping {name}: {why}")
        check_fail: dict[str, str] = {}
        eager = [n for n in names if n != "floor" and not common.is_compiled(n)]
        if check and eager:
            res, _, _ = spawn_worker("check", CHECK_SHAPE, dtype, limits, threads=threads,
                                     seed=seed, providers=eager)
            for name, c in res.get("check", {}).items():
                _log(f"[bench] check {dtype} {name}: " + (c.get("error") or ", ".join(
                    f"{k} rel err {c[k]:.1e}" for k in ("loss", "grad_h", "grad_w"))))
                if not c["ok"]:
                    check_fail[name] = "disagrees with float64 at the check shape"
            if res["status"] != "ok":
                problems.append(f"agreement check {dtype}: {res['status']} {res.get('error')}")
        batch, interrupted = [], False
        for name in names:
            _log(f"[bench] {name} {dtype} {shape} ...")
            try:
                r = run_provider(name, shape, dtype, limits, repeats=repeats, warmup=warmup,
                                 threads=threads, seed=seed)
            except (KeyboardInterrupt, SystemExit):  # keep what was measured (worker killed)
                problems.append(f"interrupted during {name} {dtype}")
                interrupted = True
                break
            _log(f"[bench]   {r.status} {_fmt(r.ms_median, '.1f')} ms, peak "
                 f"{_fmt(r.peak_mib, '.0f')} MiB {r.error}")
            batch.append(r)
        for name, why in {**check_fail, **loss_disagreements(batch, dtype)}.items():
            for r in batch:
                if r.provider == name:
                    r.status = "LOSS MISMATCH" if r.status == "ok" else r.status
                    r.note = why
            problems.append(f"{name} {dtype}: {why}")
        problems += [f"{r.provider} {dtype}: {r.status}: {r.error}" for r in batch
                     if r.status in ("error", "crash", "timeout")]
        results += batch
        if interrupted:
            break
    return results, problems


def _header(shape: common.Shape, repeats: int, threads: int | None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"Fused-linear forward KL (T=1), forward + backward, shape {common.shape_name(shape)}"
            f" (N={shape.n}, V={shape.vocab}, Ds={shape.ds}, Dt={shape.dt}); median of "
            f"{repeats}; {threads or torch.get_num_threads()} threads; {cpu} "
            f"({torch.backends.cpu.get_cpu_capability()}); "
            f"torch {torch.__version__}; one process per provider (peak = its max RSS).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="S1", help="S1, S2 or N,V,Ds,Dt (default S1)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "both"])
    p.add_argument("--providers", nargs="+", default=None,
                   help="subset to run (the floor always runs): floor, kdkernels (all "
                        "available impls) or kdkernels:<impl>, naive, naive-compiled, liger, "
                        "liger-compiled, trl")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (compiles)")
    p.add_argument("--csv", default=None, help="also write the results to this CSV")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-limit-mib", type=float, default=20 * 1024,
                   help="kill a worker whose RSS exceeds this and report OOM (default 20 GiB)")
    p.add_argument("--min-available-mib", type=float, default=1024,
                   help="kill the worker if the machine's MemAvailable drops below this")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    p.add_argument("--no-check", action="store_true",
                   help="skip the agreement check of the eager providers at a tiny shape")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0, or 1 when a provider failed (not OOM) or disagreed."""
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args)
    try:  # SIGTERM unwinds like Ctrl-C, so the running worker is killed too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    except ValueError:  # not the main thread: leave signal handling to the caller
        pass
    try:
        shape = common.parse_shape(args.shape)
    except ValueError as err:
        raise SystemExit(f"--shape: {err}") from None
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    dtypes = ["bf16", "fp32"] if args.dtype == "both" else [args.dtype]
    limits = Limits(args.mem_limit_mib, args.min_available_mib, args.timeout)
    results, problems = run_benchmark(shape, dtypes, args.providers, limits,
                                      repeats=args.repeats, warmup=args.warmup,
                                      threads=args.threads, seed=args.seed,
                                      check=not args.no_check)
    if args.csv:
        write_csv(args.csv, results)
        _log(f"[bench] wrote {args.csv}")
    for p in problems:
        _log(f"[bench] PROBLEM: {p}")
    print(_header(shape, args.repeats, args.threads))
    print()
    print(markdown_table(results))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
