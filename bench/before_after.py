"""Before/after CPU benchmark of two checkouts, interleaved in one run.

    python bench/interleave.py --before ../baseline --after . --shape S1 --rounds 3

Each round runs ``bench/bench_cpu.py`` of every checkout in turn (its own code, its own
compiled extension: the cache is keyed by a hash of the sources), for every dtype, so both
see the same machine noise; the rounds alternate which goes first. It reports, per
checkout, provider and dtype, the median over rounds of each run's median, the ratio to the
floor measured in the same run, and the after / before ratio. Shared, noisy machines:
quote ratios, not milliseconds.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path


def run_tree(root: Path, shape: str, dtype: str, providers: list[str], repeats: int,
             threads: int | None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.csv"
        cmd = [sys.executable, str(root / "bench" / "bench_cpu.py"), "--shape", shape,
               "--dtype", dtype, "--repeats", str(repeats), "--csv", str(out), "--no-check",
               "--providers", *providers]
        if threads:
            cmd += ["--threads", str(threads)]
        subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="checkout measured first")
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--shape", default="S1")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--providers", nargs="+", default=["floor", "kdkernels:cpp",
                                                        "kdkernels:torch"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--csv", type=Path, default=None, help="every run's rows, with its round")
    args = ap.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    ms: dict[tuple, list[float]] = defaultdict(list)
    ratio: dict[tuple, list[float]] = defaultdict(list)
    peak: dict[tuple, list[float]] = defaultdict(list)
    rows_out = []
    for rnd in range(args.rounds):
        order = list(trees) if rnd % 2 == 0 else list(reversed(trees))
        for dtype in args.dtypes:
            for tag in order:
                rows = run_tree(trees[tag], args.shape, dtype, args.providers, args.repeats,
                                args.threads)
                for r in rows:
                    key = (tag, r["provider"], r["dtype"])
                    if r["status"] != "ok":
                        print(f"round {rnd} {key}: {r['status']} {r['error']}", file=sys.stderr)
                        continue
                    ms[key].append(float(r["ms_median"]))
                    peak[key].append(float(r["peak_mib"]))
                    if r["ratio_floor"]:
                        ratio[key].append(float(r["ratio_floor"]))
                    rows_out.append({"round": rnd, "tree": tag, **r})
                print(f"round {rnd} {tag} {dtype}: " + ", ".join(
                    f"{r['provider']} {float(r['ms_median'] or 'nan'):.0f} ms" for r in rows),
                    file=sys.stderr, flush=True)
    print("| provider | dtype | before ms | after ms | after / before | before / floor | "
          "after / floor | before peak MiB | after peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    for dtype in args.dtypes:
        for prov in args.providers:
            b, a = (med(ms[(t, prov, dtype)]) for t in ("before", "after"))
            rb, ra = (med(ratio[(t, prov, dtype)]) for t in ("before", "after"))
            pb, pa = (med(peak[(t, prov, dtype)]) for t in ("before", "after"))
            print(f"| {prov} | {dtype} | {b:.0f} | {a:.0f} | {a / b:.3f} | {rb:.3f} | "
                  f"{ra:.3f} | {pb:.0f} | {pa:.0f} |")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows_out[0]))
            writer.writeheader()
            writer.writerows(rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
