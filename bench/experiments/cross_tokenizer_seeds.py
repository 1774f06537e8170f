"""`kdk distill --preset cross-tokenizer` over several seeds: one fresh process per seed, then a
CSV and a Markdown table of held-out bits per byte (teacher, CE-only, ULD and hybrid
students; mean ± spread over the seeds), with each run's wall time and thread count.

    flock /tmp/kdk_heavy.lock python bench/experiments/cross_tokenizer_seeds.py --seeds 0 1 2 \
        --runs /tmp/cross-tokenizer-runs --out bench/results/cpu/cross_tokenizer_seeds

Bits per byte because per-token CE is not comparable across tokenizers (the teacher's 8192-
and the students' 6000-token BPEs cut the same text into different numbers of tokens).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = (("teacher", "teacher (8192-token BPE, cached)"), ("ce", "student, CE only"),
          ("uld", "student, ULD + CE"), ("hybrid", "student, GOLD hybrid + CE"))


def _cpu() -> str:
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def run_seed(seed: int, runs: Path, preset: str, extra: list[str]) -> dict:
    out = runs / f"seed-{seed}"
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "kdkernels.cli", "distill", "--preset", preset, "--seed",
           str(seed), "-o", str(out), "--overwrite", "--no-progress", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    res = json.loads((out / "results.json").read_text())["results"]
    report = (out / "report.md").read_text()
    threads = next((line.split(",")[1].strip().split()[0] for line in report.splitlines()
                    if line.startswith("- machine:")), "?")
    row = {"seed": seed}
    for key, _ in MODELS:
        r = res.get(key, {})
        row[f"{key}_bpb"] = r.get("bits_per_byte")
        row[f"{key}_ce_per_token"] = r.get("heldout_ce")
        row[f"{key}_wall_s"] = r.get("wall_s") if key != "teacher" else None
    row.update(teacher_cached=bool(res["teacher"].get("cached")), run_wall_s=round(wall, 1),
               threads=threads, load_start=f"{load0[0]:.1f}",
               load_end=f"{os.getloadavg()[0]:.1f}")
    return row


def _ms(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def write(rows: list[dict], out: Path, cmd: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# `kdk distill --preset cross-tokenizer` over {len(rows)} seeds", "",
             "Teacher: the embedded default (Llama 192/4/4/512 on the Python stdlib corpus, "
             "its 8192-token byte-level BPE, cached). Students (Llama 96/2/4/256, one "
             "initialisation per seed, the same character windows): their own 6000-token "
             "byte-level BPE trained on the same files; CE only, ULD + CE, GOLD's hybrid + CE "
             "(kd 0.8, ce 0.2, T = 1, merge observed), fused from both hidden states.", "",
             "Held-out quality in **bits per byte** (summed NLL / (ln 2 x UTF-8 bytes) over the "
             "same held-out windows for every model): per-token CE is not comparable across "
             "tokenizers. Lower is better.", "",
             f"Machine: {_cpu()}; shared with other jobs (load averages below), so wall times "
             "carry their noise.", "", f"Command: `{cmd}`", "",
             "| seed | " + " | ".join(label for _, label in MODELS)
             + " | ULD - CE only | hybrid - CE only | run wall s | threads | load start / end |",
             "|---|" + "---|" * (len(MODELS) + 5)]
    for r in rows:
        cells = [f"{r[f'{k}_bpb']:.4f}" for k, _ in MODELS]
        lines.append(f"| {r['seed']} | " + " | ".join(cells)
                     + f" | {r['uld_bpb'] - r['ce_bpb']:+.4f} | "
                       f"{r['hybrid_bpb'] - r['ce_bpb']:+.4f} | {r['run_wall_s']:.0f} | "
                       f"{r['threads']} | {r['load_start']} / {r['load_end']} |")
    lines += ["", "Mean ± standard deviation over the seeds (bits per byte):", "",
              "| model | held-out bits per byte |", "|---|---|"]
    for key, label in MODELS:
        lines.append(f"| {label} | {_ms([r[f'{key}_bpb'] for r in rows])} |")
    for key in ("uld", "hybrid"):
        d = [r[f"{key}_bpb"] - r["ce_bpb"] for r in rows]
        better = sum(x < 0 for x in d)
        lines.append(f"| {key} - CE only | {_ms(d)} ({better}/{len(rows)} seeds better) |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", type=Path, default=Path("cross-tokenizer-runs"))
    p.add_argument("--out", type=Path, default=Path("bench/results/cpu/cross_tokenizer_seeds"))
    p.add_argument("--preset", default="cross-tokenizer")
    p.add_argument("extra", nargs="*", help="more kdk distill options (after --)")
    args = p.parse_args(argv)
    cmd = "python bench/experiments/cross_tokenizer_seeds.py " + \
        " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args.runs, args.preset, list(args.extra)))
        write(rows, args.out, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
