"""Before/after CPU benchmark of two checkouts of kdkernels, interleaved in one run.

    python bench/before_after.py --before ../baseline --after . --shape S1 --rounds 6 \
        --md bench/results/cpu/NAME.md --csv bench/results/cpu/NAME.csv
    python bench/before_after.py --before ../baseline --after . --prompt-frac 0.5  # masked

Every measurement is one worker process of bench/loss.py (this checkout's harness and
inputs) that imports kdkernels from the checkout it times (``--tree``) and calls it through
its public API only, ``kdkernels.fused_linear_kd_loss``: any two checkouts compare, however
their internals are laid out; each loads its own compiled extension (the cache is keyed by a
hash of the sources). Each round runs, for every dtype, both checkouts in turn (the order
alternates between rounds, and so does the providers' order) so that both see the same
machine noise, plus this checkout's GEMM floor (the floor needs kdkernels' internals, so it is
always this checkout's). Reported per provider and dtype: the median over rounds of each
run's median, after / before (ratio of those medians, and the median and range of the
per-round ratios), each side's ratio to the floor of the same rounds, each side's fastest
call of all rounds, and peak RSS. Shared, noisy machines: quote ratios, not milliseconds.
``--from-csv`` prints the table of a saved run again. ``--prompt-frac`` is the prompt-masked case:
the first part of every 512-token sequence ignored.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench import common, harness, loss  # noqa: E402

FLOOR = "floor (this checkout)"


def _revision(tree: Path) -> str:
    """The checkout's commit, and whether its working tree differs from it."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return head + (" + uncommitted changes" if dirty else "")


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(per-run rows, the summary rows)."""
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    limits = harness.Limits(args.mem_limit_mib, args.min_available_mib, args.timeout)
    shape = common.parse_shape(args.shape)
    providers = [common.KDK_PREFIX + impl for impl in args.impls]
    runs: list[dict] = []
    for rnd in range(args.rounds):
        for dtype in args.dtypes:
            jobs = [(tag, name) for tag in harness.round_order(list(trees), rnd)
                    for name in harness.round_order(providers, rnd)]
            if not args.no_floor:
                jobs.insert(rnd % (len(jobs) + 1), ("after", FLOOR))
            for tag, name in jobs:
                opts = loss.RunOptions("dense", args.repeats, args.warmup, args.threads,
                                       args.seed, prompt_frac=args.prompt_frac,
                                       tree=None if name == FLOOR else trees[tag])
                provider = "floor" if name == FLOOR else name
                r = loss.run_provider(provider, shape, dtype, limits, opts)
                if r.status == "ok" and name != FLOOR and Path(r.kdkernels) != trees[tag]:
                    raise SystemExit(f"{tag}: the worker imported kdkernels from "
                                     f"{r.kdkernels}, not {trees[tag]}")
                row = {"round": rnd, "tree": "this checkout" if name == FLOOR else tag,
                       "provider": name, "dtype": dtype, "status": r.status,
                       "ms_median": r.ms_median, "times_ms": " ".join(
                           f"{t:.1f}" for t in r.times_ms), "peak_mib": r.peak_mib,
                       "loss": r.loss, "load_avg": os.getloadavg()[0], "error": r.error}
                runs.append(row)
                print(f"round {rnd + 1}/{args.rounds} {dtype} {row['tree']:>13} {name}: "
                      f"{r.status} {loss._fmt(r.ms_median, '.0f')} ms, load "
                      f"{row['load_avg']:.1f} {r.error}", file=sys.stderr, flush=True)
    return runs, summarize(runs, providers, args.dtypes, args.no_floor)


def summarize(runs: list[dict], providers: list[str], dtypes: list[str], no_floor: bool
              ) -> list[dict]:
    ok = [r for r in runs if r["status"] == "ok"]
    ms: dict[tuple, list[float]] = defaultdict(list)
    peak: dict[tuple, list[float]] = defaultdict(list)
    best: dict[tuple, float] = defaultdict(lambda: float("nan"))
    by_round: dict[tuple, float] = {}
    for r in ok:
        key = (r["tree"], r["provider"], r["dtype"])
        ms[key].append(r["ms_median"])
        peak[key].append(r["peak_mib"])
        by_round[(*key, r["round"])] = r["ms_median"]
        calls = [float(t) for t in str(r.get("times_ms") or "").split()]
        if calls:  # the fastest call: the least disturbed by co-tenants
            best[key] = min(calls) if best[key] != best[key] else min(best[key], *calls)
    out = []
    for dtype in dtypes:
        floor = _med(ms[("this checkout", FLOOR, dtype)])
        if not no_floor:
            out.append({"provider": FLOOR, "dtype": dtype, "after_ms": floor,
                        "after_best_ms": best[("this checkout", FLOOR, dtype)],
                        "rounds": len(ms[("this checkout", FLOOR, dtype)])})
        for prov in providers:
            b, a = (_med(ms[(t, prov, dtype)]) for t in ("before", "after"))
            rounds = sorted({k[3] for k in by_round if k[1] == prov and k[2] == dtype})
            ratios = [by_round[("after", prov, dtype, i)] / by_round[("before", prov, dtype, i)]
                      for i in rounds if ("after", prov, dtype, i) in by_round
                      and ("before", prov, dtype, i) in by_round]
            out.append({"provider": prov, "dtype": dtype, "before_ms": b, "after_ms": a,
                        "after_over_before": a / b, "round_ratio_median": _med(ratios),
                        "round_ratio_min": min(ratios, default=float("nan")),
                        "round_ratio_max": max(ratios, default=float("nan")),
                        "before_over_floor": b / floor, "after_over_floor": a / floor,
                        "before_best_ms": best[("before", prov, dtype)],
                        "after_best_ms": best[("after", prov, dtype)],
                        "before_peak_mib": _med(peak[("before", prov, dtype)]),
                        "after_peak_mib": _med(peak[("after", prov, dtype)]),
                        "rounds": len(ratios)})
    return out


def markdown(summary: list[dict]) -> str:
    def f(x, spec: str) -> str:
        return "—" if x is None or x != x else format(x, spec)

    lines = ["| provider | dtype | before ms | after ms | after / before | per-round ratio: "
             "median (min–max) | before / floor | after / floor | fastest call ms: before, "
             "after | before peak MiB | after peak MiB | rounds |",
             "|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|"]
    for s in summary:
        if s["provider"] == FLOOR:
            lines.append(f"| {FLOOR} | {s['dtype']} | | {f(s['after_ms'], '.0f')} | | | | | "
                         f"{f(s['after_best_ms'], '.0f')} | | | {s['rounds']} |")
            continue
        lines.append(
            f"| {s['provider']} | {s['dtype']} | {f(s['before_ms'], '.0f')} | "
            f"{f(s['after_ms'], '.0f')} | {f(s['after_over_before'], '.3f')} | "
            f"{f(s['round_ratio_median'], '.3f')} ({f(s['round_ratio_min'], '.3f')}–"
            f"{f(s['round_ratio_max'], '.3f')}) | {f(s['before_over_floor'], '.3f')} | "
            f"{f(s['after_over_floor'], '.3f')} | {f(s['before_best_ms'], '.0f')}, "
            f"{f(s['after_best_ms'], '.0f')} | {f(s['before_peak_mib'], '.0f')} | "
            f"{f(s['after_peak_mib'], '.0f')} | {s['rounds']} |")
    return "\n".join(lines)


def from_csv(path: Path) -> str:
    """The table of a run saved with --csv."""
    with open(path, newline="") as f:
        runs = list(csv.DictReader(f))
    for r in runs:
        r["round"] = int(r["round"])
        for k in ("ms_median", "peak_mib"):
            r[k] = float(r[k]) if r[k] else None
    providers = list(dict.fromkeys(r["provider"] for r in runs if r["provider"] != FLOOR))
    dtypes = list(dict.fromkeys(r["dtype"] for r in runs))
    no_floor = all(r["provider"] != FLOOR for r in runs)
    return markdown(summarize(runs, providers, dtypes, no_floor))


def header(args: argparse.Namespace, started: str, seconds: float) -> str:
    shape = common.parse_shape(args.shape)
    mask = (f"; labels: the first {args.prompt_frac:.0%} of every 512-token sequence ignored"
            if args.prompt_frac else "")
    return "\n".join([
        f"Before/after, fused-linear forward KL (T=1), forward + backward, "
        f"{common.shape_name(shape)} (N={shape.n}, V={shape.vocab}, Ds={shape.ds}, "
        f"Dt={shape.dt}){mask}.",
        "",
        f"- machine: {harness.machine()}; {args.threads or 'torch default'} threads",
        f"- before: {args.before.resolve()} ({_revision(args.before.resolve())})",
        f"- after: {args.after.resolve()} ({_revision(args.after.resolve())})",
        f"- {args.rounds} interleaved rounds (started {started}, {seconds / 60:.0f} min); each "
        f"run one worker process: {args.warmup} untimed + {args.repeats} timed calls, its "
        f"median; the table gives the median over rounds",
        "- command: `python bench/before_after.py " + " ".join(args.argv) + "`",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="the checkout before the change")
    ap.add_argument("--after", type=Path)
    ap.add_argument("--from-csv", type=Path, default=None,
                    help="print the table of a run saved with --csv, and stop")
    ap.add_argument("--shape", default="S1")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--impls", nargs="+", default=["cpp", "torch"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-frac", type=float, default=0.0,
                    help="the prompt-masked case: ignore this fraction of each 512 tokens")
    ap.add_argument("--no-floor", action="store_true", help="skip this checkout's floor")
    ap.add_argument("--mem-limit-mib", type=float, default=20 * 1024)
    ap.add_argument("--min-available-mib", type=float, default=1024)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    ap.add_argument("--csv", type=Path, default=None, help="every run, with its round")
    ap.add_argument("--md", type=Path, default=None, help="the header and the table")
    args = ap.parse_args(argv)
    if args.from_csv:
        print(from_csv(args.from_csv))
        return 0
    if args.before is None or args.after is None:
        ap.error("--before and --after are required")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    started, t0 = time.strftime("%Y-%m-%d %H:%M"), time.monotonic()
    runs, summary = run(args)
    text = header(args, started, time.monotonic() - t0) + "\n\n" + markdown(summary)
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text + "\n")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(runs[0]))
            writer.writeheader()
            writer.writerows(runs)
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
