"""The loss benchmark: a fused-linear distillation loss, forward plus backward, against the
GEMM floor measured in the same run and against its peers, on CPU or CUDA, with a dense or
a sparse (top-k) teacher.

    python bench/loss.py --shape S1 --dtype bf16 --csv bench/results/cpu/s1_bf16.csv
    python bench/loss.py --loss topk --shape S2 --dtype both --rounds 2
    python bench/loss.py --device cuda --out DIR [--dry-run]   # gpu_bench.csv, gpu_rowops.csv
    python bench/loss.py --device cuda --loss topk --out DIR   # gpu_topk.csv

CPU: each measurement runs in its own worker process (bench/harness.py: this file with
--worker), so its peak RSS is its own and an out-of-memory kill is a result ("OOM"), not the
end of the benchmark; ``--rounds`` interleaves the providers, alternating their order.
``--tree DIR`` times another checkout's kdkernels through its public API (the before/after
harness, bench/before_after.py, uses it). CUDA: one process, triton's do_bench medians and
CUDA peaks (bench/loss_cuda.py). Providers: bench/common.py (dense), bench/topk.py (top-k).
See bench/README.md for what is timed and what each column means.
"""

from __future__ import annotations

import argparse
import csv
import math
import signal
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench import common, harness, loss_cuda, topk  # noqa: E402

# Loose agreement bounds between providers (relative): they catch a different loss (another
# divergence, a missing normaliser), not rounding. bf16 logits carry ~2**-8 relative error.
LOSS_RTOL = {"bf16": 3e-2, "fp32": 1e-4}
GRAD_RTOL = {"bf16": 1e-1, "fp32": 1e-3}
CHECK_SHAPE = common.Shape(37, 1009, 24, 40)  # tiny, odd sizes: the cheap agreement check
DENSE_NAMES = ("floor", "kdkernels", "naive", "naive-compiled", "liger", "liger-compiled",
               "trl")  # plus kdkernels:<impl>
DEFAULT_SHAPES = {("cpu", "dense"): ["S1"], ("cpu", "topk"): ["S1"],
                  ("cuda", "dense"): list(loss_cuda.GPU_SHAPES), ("cuda", "topk"): ["S1", "S2"]}


@dataclass
class Result:
    provider: str
    dtype: str
    shape: str
    k: int | None = None  # teacher ids per token (top-k loss)
    status: str = "ok"  # ok | OOM | timeout | error | crash | LOSS MISMATCH
    ms_median: float | None = None
    times_ms: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    base_mib: float | None = None  # RSS after imports and inputs, before the first call
    loss: float | None = None
    note: str = ""
    error: str = ""
    kdkernels: str = ""  # the checkout whose kdkernels the worker imported

    @property
    def peak_above_inputs_mib(self) -> float | None:
        ok = self.peak_mib is not None and self.base_mib is not None
        return self.peak_mib - self.base_mib if ok else None


@dataclass
class RunOptions:
    """What every worker of one run shares."""
    loss: str = "dense"  # dense | topk
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    seed: int = 0
    k: int = 64
    prompt_frac: float = 0.0  # dense: ignore the first part of every 512-token sequence
    tree: Path | None = None  # time this checkout's kdkernels (public API only)


# ----------------------------------------------------------------------------- worker side


def _import_kdkernels(tree: str | None) -> str:
    """Import kdkernels, from ``tree`` when given (before anything else imports it); returns
    the checkout it came from."""
    if tree:
        sys.path.insert(0, str(Path(tree).resolve()))
    import kdkernels

    where = Path(kdkernels.__file__).resolve().parent.parent
    if tree and where != Path(tree).resolve():
        raise RuntimeError(f"--tree {tree}: kdkernels was imported from {where}")
    return str(where)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def check_providers(names: list[str], shape: common.Shape, dtype: str, seed: int) -> dict:
    """Loss and gradients of each dense provider against naive_loss in float64 on the same
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


def _build(name: str, args: argparse.Namespace, inputs: common.Inputs):
    """(run() -> loss or None, note) of one provider on the worker's inputs."""
    if name == "floor" and args.tree and Path(args.tree).resolve() != _ROOT:
        raise ValueError("the floor runs kdkernels' internals: it times this checkout only")
    if args.loss == "topk":
        return topk.build(name, inputs, *args.teacher)
    run = common.build_provider(name, inputs)
    if isinstance(run, common.Floor):  # its chunking is known once it has run
        def note() -> str:
            plan = run.plan()
            return f"chunk {plan.chunk} rows, as kdkernels impl={plan.mirrors}"
        return (lambda: run(inputs)), note
    return (lambda: run(inputs)), ""


def _measure(args: argparse.Namespace) -> dict:
    where = _import_kdkernels(args.tree)
    shape = common.parse_shape(args.shape[0])
    if args.worker == "check":
        return {"check": check_providers(args.providers or [], shape, args.dtype, args.seed),
                "kdkernels": where}
    inputs = common.make_inputs(shape, common.DTYPES[args.dtype], "cpu", args.seed)
    if args.prompt_frac:
        common.mask_prompts(inputs, args.prompt_frac)
    if args.loss == "topk":
        if args.worker != "dense_fused":  # the teacher's tensors are not an input of the others
            inputs.teacher_hidden = inputs.teacher_weight = None
        args.teacher = topk.make_teacher(shape.n, shape.vocab, args.k, args.seed)
    base = harness.rss_mib()
    run, note = _build(args.worker, args, inputs)
    times, out = harness.time_calls(run, inputs.clear_grads, args.repeats, args.warmup)
    return {"times_ms": times, "loss": None if out is None else float(out), "base_mib": base,
            "note": note() if callable(note) else note, "kdkernels": where}


# ----------------------------------------------------------------------------- parent side


def worker_argv(name: str, shape: common.Shape, dtype: str, opts: RunOptions,
                providers: list[str] | None = None) -> list[str]:
    argv = [str(Path(__file__).resolve()), "--worker", name, "--loss", opts.loss,
            "--shape", str(shape), "--dtype", dtype, "--repeats", str(opts.repeats),
            "--warmup", str(opts.warmup), "--seed", str(opts.seed), "--k", str(opts.k),
            "--prompt-frac", str(opts.prompt_frac)]
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    if opts.tree:
        argv += ["--tree", str(opts.tree)]
    if providers:
        argv += ["--providers", *providers]
    return argv


def run_provider(name: str, shape: common.Shape, dtype: str, limits: harness.Limits,
                 opts: RunOptions | None = None) -> Result:
    """One worker process timing one provider."""
    opts = opts or RunOptions()
    res, _rc, wait_peak = harness.spawn_worker(worker_argv(name, shape, dtype, opts), limits,
                                               opts.threads)
    out = Result(name, dtype, common.shape_name(shape),
                 k=opts.k if opts.loss == "topk" else None, status=res["status"],
                 times_ms=res.get("times_ms", []), peak_mib=res.get("peak_mib") or wait_peak,
                 base_mib=res.get("base_mib"), loss=res.get("loss"), note=res.get("note", ""),
                 error=res.get("error", ""), kdkernels=res.get("kdkernels", ""))
    if out.times_ms:
        out.ms_median = statistics.median(out.times_ms)
    return out


def merge_rounds(runs: list[Result]) -> Result:
    """One provider over several rounds: the median of every timed call, the highest peak."""
    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        return runs[0]
    out = Result(**{**asdict(ok[0]), "times_ms": [t for r in ok for t in r.times_ms]})
    out.ms_median = statistics.median(out.times_ms)
    out.peak_mib = max(r.peak_mib for r in ok)
    out.base_mib = min(r.base_mib for r in ok if r.base_mib is not None) if any(
        r.base_mib is not None for r in ok) else None
    if len(ok) < len(runs):
        out.note = (out.note + "; " if out.note else "") + \
            f"{len(runs) - len(ok)} of {len(runs)} rounds failed"
    return out


def loss_disagreements(results: list[Result], dtype: str,
                       among: tuple[str, ...] | None = None) -> dict[str, str]:
    """Providers (of ``among``, default all) whose loss is off the median of their measured
    losses by more than the dtype's loose tolerance."""
    losses = {r.provider: r.loss for r in results
              if r.loss is not None and (among is None or r.provider in among)}
    finite = [v for v in losses.values() if math.isfinite(v)]
    if len(losses) < 2:
        return {}
    if not finite:
        return {name: "non-finite loss" for name in losses}
    ref = statistics.median(finite)
    bad = {}
    for name, value in losses.items():
        if not math.isfinite(value) or abs(value - ref) > LOSS_RTOL[dtype] * max(1.0, abs(ref)):
            bad[name] = f"loss {value:.6g} vs median {ref:.6g} of the compared providers"
    return bad


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown_table(results: list[Result]) -> str:
    floors = {(r.dtype, r.shape): r for r in results if r.provider == "floor" and r.ms_median}
    lines = ["| provider | dtype | shape | ms (median) | peak MiB | above inputs MiB "
             "| x floor (time) | peak - floor MiB | loss | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        floor = floors.get((r.dtype, r.shape))
        ratio = r.ms_median / floor.ms_median if floor and r.ms_median else None
        dpeak = (r.peak_mib - floor.peak_mib if floor and r.peak_mib and floor.peak_mib
                 and r.status == "ok" else None)
        status = r.status + (f": {r.note}" if r.note else "")
        lines.append(f"| {r.provider} | {r.dtype} | {r.shape} | {_fmt(r.ms_median, '.0f')} | "
                     f"{_fmt(r.peak_mib, '.0f')} | {_fmt(r.peak_above_inputs_mib, '.0f')} | "
                     f"{_fmt(ratio, '.2f')} | {_fmt(dpeak, '+.0f')} | {_fmt(r.loss, '.5f')} | "
                     f"{status} |")
    return "\n".join(lines)


CSV_FIELDS = ("provider", "dtype", "shape", "k", "status", "ms_median", "times_ms",
              "peak_mib", "base_mib", "peak_above_inputs_mib", "ratio_floor", "loss", "note",
              "error", "machine")


def write_csv(path: str | Path, results: list[Result]) -> None:
    floors = {(r.dtype, r.shape): r.ms_median for r in results if r.provider == "floor"}
    where = harness.machine()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            row = {k: v for k, v in asdict(r).items() if k in CSV_FIELDS}
            row["times_ms"] = " ".join(f"{t:.2f}" for t in r.times_ms)
            row["peak_above_inputs_mib"] = r.peak_above_inputs_mib
            floor = floors.get((r.dtype, r.shape))
            row["ratio_floor"] = r.ms_median / floor if floor and r.ms_median else ""
            row["machine"] = where
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


def _providers(loss: str, dtype: str, requested: list[str] | None) -> list[str]:
    if loss == "topk":
        return _select(requested, list(topk.PROVIDERS + topk.EXTRA), {}) if requested \
            else list(topk.PROVIDERS)
    available, skipped = common.discover_providers("cpu", common.DTYPES[dtype])
    if not requested:
        for name, why in skipped.items():
            _log(f"[bench] skipping {name}: {why}")
    return _select(requested, available, skipped)


def _check(names: list[str], dtype: str, limits: harness.Limits, opts: RunOptions
           ) -> tuple[dict[str, str], list[str]]:
    """The float64 agreement check of the eager dense providers at a tiny shape, in a
    worker: ({provider: why it failed}, problems)."""
    eager = [n for n in names if n != "floor" and not common.is_compiled(n)]
    if not eager:
        return {}, []
    res, _, _ = harness.spawn_worker(worker_argv("check", CHECK_SHAPE, dtype, opts, eager),
                                     limits, opts.threads)
    failed = {}
    for name, c in res.get("check", {}).items():
        _log(f"[bench] check {dtype} {name}: " + (c.get("error") or ", ".join(
            f"{k} rel err {c[k]:.1e}" for k in ("loss", "grad_h", "grad_w"))))
        if not c["ok"]:
            failed[name] = "disagrees with float64 at the check shape"
    problems = ([] if res["status"] == "ok" else
                [f"agreement check {dtype}: {res['status']} {res.get('error')}"])
    return failed, problems


def run_benchmark(shapes: list[common.Shape], dtypes: list[str], providers: list[str] | None,
                  limits: harness.Limits, opts: RunOptions | None = None, *, rounds: int = 1,
                  check: bool = True) -> tuple[list[Result], list[str]]:
    """Every shape x dtype x provider, one worker process each per round; returns (results,
    problems)."""
    opts = opts or RunOptions()
    results, problems = [], []
    for shape in shapes:
        for dtype in dtypes:
            names = _providers(opts.loss, dtype, providers)
            check_fail: dict[str, str] = {}
            if check and opts.loss == "dense":
                check_fail, why = _check(names, dtype, limits, opts)
                problems += why
            got: dict[str, list[Result]] = {name: [] for name in names}
            interrupted = False
            for rnd in range(rounds):
                for name in harness.round_order(names, rnd):
                    _log(f"[bench] round {rnd + 1}/{rounds}: {name} {dtype} {shape} ...")
                    try:
                        r = run_provider(name, shape, dtype, limits, opts)
                    except (KeyboardInterrupt, SystemExit):  # keep what was measured
                        problems.append(f"interrupted during {name} {dtype}")
                        interrupted = True
                        break
                    _log(f"[bench]   {r.status} {_fmt(r.ms_median, '.1f')} ms, peak "
                         f"{_fmt(r.peak_mib, '.0f')} MiB {r.error}")
                    got[name].append(r)
                if interrupted:
                    break
            batch = [merge_rounds(got[name]) for name in names if got[name]]
            among = topk.AGREE if opts.loss == "topk" else None
            for name, why in {**check_fail, **loss_disagreements(batch, dtype, among)}.items():
                for r in batch:
                    if r.provider == name:
                        r.status = "LOSS MISMATCH" if r.status == "ok" else r.status
                        r.note = why
                problems.append(f"{name} {dtype}: {why}")
            problems += [f"{r.provider} {dtype}: {r.status}: {r.error}" for r in batch
                         if r.status in ("error", "crash", "timeout")]
            results += batch
            if interrupted:
                return results, problems
    return results, problems


def _header(shapes: list[common.Shape], opts: RunOptions, rounds: int) -> str:
    what = ("Fused-linear forward KL (T=1)" if opts.loss == "dense" else
            f"Fused-linear top-k forward KL (T=1, K={opts.k} teacher ids per token)")
    dims = "; ".join(f"{common.shape_name(s)} (N={s.n}, V={s.vocab}, Ds={s.ds}, Dt={s.dt})"
                     for s in shapes)
    rounds_text = f" per round, {rounds} interleaved rounds" if rounds > 1 else ""
    mask = f"; first {opts.prompt_frac:.0%} of each 512-token sequence ignored" \
        if opts.prompt_frac else ""
    return (f"{what}, forward + backward, {dims}{mask}; median of {opts.repeats}{rounds_text}; "
            f"{opts.threads or torch.get_num_threads()} threads; {harness.machine()}; "
            f"one process per provider (peak = its max RSS).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--loss", default="dense", choices=["dense", "topk"],
                   help="dense teacher (hidden states + head) or top-k teacher (ids, log-probs)")
    p.add_argument("--shape", nargs="+", default=None,
                   help=f"{', '.join(common.SHAPES)} or N,V,Ds,Dt (default: S1 on CPU; the "
                        f"GPU shapes, or S1 S2 for top-k, on CUDA)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "both"])
    p.add_argument("--providers", nargs="+", default=None,
                   help="subset to run (the floor always runs). dense: floor, kdkernels (all "
                        "available impls) or kdkernels:<impl>, naive, naive-compiled, liger, "
                        "liger-compiled, trl; on CUDA: " + ", ".join(loss_cuda.PROVIDERS)
                        + "; top-k: " + ", ".join(topk.PROVIDERS + topk.EXTRA))
    p.add_argument("--k", type=int, default=64, help="top-k: teacher ids per token")
    p.add_argument("--repeats", type=int, default=3, help="CPU: timed calls (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="CPU: untimed calls first (compiles)")
    p.add_argument("--rounds", type=int, default=1,
                   help="CPU: interleaved rounds of every provider (order alternates)")
    p.add_argument("--csv", default=None, help="CPU: also write the results to this CSV")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-frac", type=float, default=0.0,
                   help="dense, CPU: ignore the first fraction of every 512-token sequence")
    p.add_argument("--tree", type=Path, default=None,
                   help="CPU: time the kdkernels of this checkout (its public API)")
    p.add_argument("--mem-limit-mib", type=float, default=20 * 1024,
                   help="CPU: kill a worker whose RSS exceeds this and report OOM (20 GiB)")
    p.add_argument("--min-available-mib", type=float, default=1024,
                   help="CPU: kill the worker if the machine's MemAvailable drops below this")
    p.add_argument("--timeout", type=float, default=3600, help="CPU: seconds per worker")
    p.add_argument("--no-check", action="store_true",
                   help="CPU: skip the agreement check of the eager providers at a tiny shape")
    p.add_argument("--out", type=Path, default=None,
                   help="CUDA: folder for the CSVs, gpu_env.json and summary.txt")
    p.add_argument("--dry-run", action="store_true", help="CUDA: no GPU work, discovery and "
                   "files only")
    p.add_argument("--budget-s", type=float, default=170.0,
                   help="CUDA: stop starting new measurements after this many seconds")
    p.add_argument("--no-sweep", action="store_true", help="CUDA: skip the row-kernel sweep")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.shape = args.shape or DEFAULT_SHAPES[(args.device, args.loss)]
    try:
        args.shapes = [common.parse_shape(s) for s in args.shape]
    except ValueError as err:
        ap.error(f"--shape: {err}")
    if args.loss == "topk":
        known = topk.PROVIDERS + topk.EXTRA
    elif args.device == "cuda":
        known = loss_cuda.PROVIDERS
    else:
        known = DENSE_NAMES
    for name in args.providers or []:
        if name not in known and not (known is DENSE_NAMES
                                      and name.startswith(common.KDK_PREFIX)):
            ap.error(f"--providers: unknown provider {name!r}; expected some of "
                     f"{', '.join(known)}")
    if args.repeats < 1 or args.warmup < 0 or args.rounds < 1:
        ap.error("--repeats and --rounds must be >= 1 and --warmup >= 0")
    if args.budget_s <= 0:
        ap.error(f"--budget-s must be > 0, got {args.budget_s}")
    if not 0.0 <= args.prompt_frac < 1.0:
        ap.error("--prompt-frac must be in [0, 1)")
    if args.device == "cuda" and args.out is None and not args.worker:
        ap.error("--device cuda needs --out DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0, or 1 when a provider failed (not OOM) or disagreed."""
    args = parse_args(argv)
    if args.worker:
        return harness.worker_main(lambda: _measure(args), args.result, args.threads)
    if args.device == "cuda":
        return loss_cuda.main(args)
    try:  # SIGTERM unwinds like Ctrl-C, so the running worker is killed too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    except ValueError:  # not the main thread: leave signal handling to the caller
        pass
    dtypes = ["bf16", "fp32"] if args.dtype == "both" else [args.dtype]
    limits = harness.Limits(args.mem_limit_mib, args.min_available_mib, args.timeout)
    opts = RunOptions(args.loss, args.repeats, args.warmup, args.threads, args.seed, args.k,
                      args.prompt_frac, args.tree)
    results, problems = run_benchmark(args.shapes, dtypes, args.providers, limits, opts,
                                      rounds=args.rounds, check=not args.no_check)
    if args.csv:
        write_csv(args.csv, results)
        _log(f"[bench] wrote {args.csv}")
    for p in problems:
        _log(f"[bench] PROBLEM: {p}")
    print(_header(args.shapes, opts, args.rounds))
    print()
    print(markdown_table(results))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
