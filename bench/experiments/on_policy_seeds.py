"""`kdk distill --preset on-policy` over several seeds: one fresh process per seed, then a CSV
and a Markdown table of held-out CE and the teacher's NLL of each student's own samples, with
wall time and generation vs training throughput.

    flock /tmp/kdk_heavy.lock python bench/experiments/on_policy_seeds.py --seeds 0 1 2 \
        --runs /tmp/on-policy-runs --out bench/results/cpu/on_policy_seeds
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

STUDENTS = ("kd", "kd-{div}", "on-policy")


def _cpu() -> str:
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
        amx = ", AMX" if " amx_tile" in flags else ""
    except OSError:
        isa, amx = "?", ""
    return f"{name}, {os.cpu_count()} cores, {isa}{amx}"


def run_seed(seed: int, runs: Path, preset: str, extra: list[str]) -> dict:
    out = runs / f"seed-{seed}"
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "kdkernels.cli", "distill", "--preset", preset, "--seed",
           str(seed), "-o", str(out), "--overwrite", "--no-progress", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    res = json.loads((out / "results.json").read_text())["results"]
    threads = next((line.split(",")[1].strip().split()[0] for line in
                    (out / "report.md").read_text().splitlines()
                    if line.startswith("- machine:")), "?")
    return {"seed": seed, "results": res, "wall_s": wall, "threads": threads,
            "load_start": f"{load0[0]:.1f}", "load_end": f"{os.getloadavg()[0]:.1f}"}


def _row(r: dict, div: str) -> dict:
    res = r["results"]
    row = {"seed": r["seed"], "teacher_ce": res["teacher"]["heldout_ce"],
           "teacher_nll_own": res["teacher"]["teacher_nll"]}
    for name in (s.format(div=div) for s in STUDENTS):
        if name not in res:
            continue
        key = name.replace("-", "_")
        row[f"{key}_ce"] = res[name]["heldout_ce"]
        row[f"{key}_nll"] = res[name]["teacher_nll"]
        row[f"{key}_len"] = res[name]["completion_len"]
        row[f"{key}_wall_s"] = res[name]["wall_s"]
    on = res["on-policy"]
    row.update(on_policy_gen_tok_s=on["gen_tokens_per_s"],
               on_policy_train_tok_s=on["train_tokens_per_s"], on_policy_gen_s=on["gen_s"],
               on_policy_train_s=on["train_s"], kd_tok_s=res["kd"]["tokens_per_s"],
               run_wall_s=r["wall_s"], threads=r["threads"], load_start=r["load_start"],
               load_end=r["load_end"])
    return row


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else \
        f"{xs[0]:.4f}"


def write(rows: list[dict], div: str, lam: float, out: Path, cmd: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    off = f"kd_{div}".replace("-", "_")
    names = [("kd", "off-policy, forward KL (today's default)"),
             (off, f"off-policy, {div}"), ("on_policy", f"on-policy LAMBDA {lam:g}, {div}")]
    lines = [f"# `kdk distill --preset on-policy` over {len(rows)} seeds", "",
             f"Machine: {_cpu()}; torch threads per run as listed (automatic choice from the "
             "load average). Co-tenant jobs (other engineers' tests) shared the machine, so "
             "wall times and tokens/s carry their noise.", "", f"Command: `{cmd}`", "",
             "| seed | model | held-out CE | teacher NLL of own samples | mean completion "
             "tokens | stage wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | teacher | {r['teacher_ce']:.4f} | "
                     f"{r['teacher_nll_own']:.4f} | — | — |")
        for key, label in names:
            if f"{key}_ce" in r:
                lines.append(f"| {r['seed']} | {label} | {r[f'{key}_ce']:.4f} | "
                             f"{r[f'{key}_nll']:.4f} | {r[f'{key}_len']:.1f} | "
                             f"{r[f'{key}_wall_s']:.0f} |")
    lines += ["", "Means ± std over seeds:", "", "| model | held-out CE | teacher NLL of own "
              "samples |", "|---|---|---|"]
    for key, label in names:
        if f"{key}_ce" in rows[0]:
            lines.append(f"| {label} | {_ms([r[f'{key}_ce'] for r in rows])} | "
                         f"{_ms([r[f'{key}_nll'] for r in rows])} |")
    base = off if f"{off}_ce" in rows[0] else "kd"
    d_nll = [r[f"{base}_nll"] - r["on_policy_nll"] for r in rows]
    d_ce = [r[f"{base}_ce"] - r["on_policy_ce"] for r in rows]
    lines += ["", f"On-policy minus {dict(names)[base]}, positive = "
                  "on-policy better: teacher NLL of own samples "
                  f"{_ms(d_nll)} nats/token ({sum(d > 0 for d in d_nll)}/{len(rows)} seeds "
                  f"better); held-out CE {_ms(d_ce)} ({sum(d > 0 for d in d_ce)}/{len(rows)} "
                  "seeds better).", "",
              "| seed | run wall s | threads | load avg start / end | on-policy generation "
              "tokens/s | on-policy training tokens/s | on-policy gen s / train s | off-policy "
              "KD tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['run_wall_s']:.0f} | {r['threads']} | "
                     f"{r['load_start']} / {r['load_end']} | {r['on_policy_gen_tok_s']:,.0f} | "
                     f"{r['on_policy_train_tok_s']:,.0f} | {r['on_policy_gen_s']:.0f} / "
                     f"{r['on_policy_train_s']:.0f} | {r['kd_tok_s']:,.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def probe(seed: int, runs: Path, out: Path, steps: int | None) -> str:
    """One seed of on-policy students only: reverse KL and JSD at LAMBDA 0.5, reverse KL at
    LAMBDA 1; returns the divergence whose LAMBDA-0.5 student the teacher scores best on its
    own samples (the quantity on-policy KD optimises)."""
    import dataclasses

    from kdkernels.train.config import preset
    from kdkernels.train.on_policy import preset as on_policy_preset

    cfg = preset("on-policy", seed=seed, output=str(runs / f"probe-{seed}"), progress=False,
                 **({"max_steps": steps} if steps else {}))
    print(f"probe: seed {seed}, {cfg.max_steps} steps", flush=True)
    variants = [(f"on-policy-{div}-{lam:g}", dataclasses.replace(cfg, divergence=div,
                                                                  on_policy=lam))
                for div, lam in (("reverse_kl", 0.5), ("jsd", 0.5), ("reverse_kl", 1.0))]
    t0 = time.perf_counter()
    res = on_policy_preset.run(cfg, overwrite=True, variants=variants)
    wall = time.perf_counter() - t0
    lines = [f"# On-policy probe: divergence and LAMBDA (seed {seed}, one run)", "",
             f"Machine: {_cpu()}. {cfg.max_steps} student steps each, the on-policy preset's "
             f"teacher, data and sampling; wall {wall:.0f} s (co-tenant load adds noise).", "",
             "| student | held-out CE | teacher NLL of own samples | mean completion tokens "
             "| wall s | gen tokens/s | train tokens/s |", "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['heldout_ce']:.4f} | {r['teacher_nll']:.4f} | "
                     f"{r['completion_len']:.1f} | {r.get('wall_s', 0):.0f} | "
                     f"{r.get('gen_tokens_per_s', 0):,.0f} | "
                     f"{r.get('train_tokens_per_s', 0):,.0f} |")
    best = min(("reverse_kl", "jsd"), key=lambda d: res[f"on-policy-{d}-0.5"]["teacher_nll"])
    lines += ["", f"Chosen divergence (lower teacher NLL of own samples at LAMBDA 0.5): {best}."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", type=Path, default=Path("on-policy-runs"))
    p.add_argument("--out", type=Path, default=Path("bench/results/cpu/on_policy_seeds"))
    p.add_argument("--preset", default="on-policy")
    p.add_argument("--probe", type=int, metavar="SEED",
                   help="first run the divergence/LAMBDA probe on this seed (written next to "
                        "--out as on_policy_probe.md) and sweep the seeds with its divergence")
    p.add_argument("--max-steps", type=int, help="student steps (default: the preset's)")
    p.add_argument("--probe-steps", type=int, help="student steps of the probe [--max-steps]")
    p.add_argument("extra", nargs="*", help="more kdk distill options (after --)")
    args = p.parse_args(argv)
    extra = list(args.extra)
    if args.max_steps:
        extra += ["--max-steps", str(args.max_steps)]
    if args.probe is not None:
        best = probe(args.probe, args.runs, args.out.with_name("on_policy_probe"),
                     args.probe_steps or args.max_steps)
        extra += ["--divergence", best]
    args.extra = extra
    rows = []
    for seed in args.seeds:
        r = run_seed(seed, args.runs, args.preset, args.extra)
        on = r["results"]["on-policy"]
        rows.append(_row(r, on["divergence"]))
        write(rows, on["divergence"], on["on_policy"], args.out,
              "flock /tmp/kdk_heavy.lock python bench/experiments/on_policy_seeds.py "
              + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
