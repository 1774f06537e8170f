"""On-policy KD from a warm student: continue the off-policy forward-KL students of a
`bench/experiments/on_policy_seeds.py` sweep (RUNS/seed-S/kd, 120 steps) for a few more steps
off-policy and on-policy, from the same weights, and score them like the preset.

    flock /tmp/kdk_heavy.lock python bench/experiments/on_policy_warm.py \
        --runs /tmp/on-policy-runs --seeds 0 1 2 --out bench/results/cpu/on_policy_warm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True, help="the seeds sweep's --runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=Path("bench/results/cpu/on_policy_warm"))
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from kdkernels.train.config import preset
    from kdkernels.train.on_policy import preset as on_policy_preset
    from kdkernels.train.runtime import checkpoint

    rows = []
    for seed in args.seeds:
        init_dir = checkpoint.latest(args.runs / f"seed-{seed}" / "kd")
        init = AutoModelForCausalLM.from_pretrained(str(init_dir))
        before = json.loads((args.runs / f"seed-{seed}" / "results.json").read_text())
        cfg = preset("on-policy", seed=seed, progress=False,
                     output=str(args.runs / f"warm-{seed}"))
        # Students continue with their own short schedule; the teacher keeps the preset's
        # (its cache key includes the warm-up).
        student = dict(max_steps=args.steps, lr=args.lr, warmup_steps=5)
        variants = [("warm-kd", dataclasses.replace(cfg, on_policy=0.0,
                                                     divergence="forward_kl", **student)),
                    ("warm-kd-reverse_kl", dataclasses.replace(cfg, on_policy=0.0, **student)),
                    ("warm-on-policy", dataclasses.replace(cfg, **student))]
        t0 = time.perf_counter()
        res = on_policy_preset.run(cfg, overwrite=True, variants=variants, init=init)
        row = {"seed": seed, "init_ce": before["results"]["kd"]["heldout_ce"],
               "init_nll": before["results"]["kd"]["teacher_nll"],
               "wall_s": time.perf_counter() - t0}
        for name, _ in variants:
            row[f"{name}_ce"] = res[name]["heldout_ce"]
            row[f"{name}_nll"] = res[name]["teacher_nll"]
        row["gen_tok_s"] = res["warm-on-policy"]["gen_tokens_per_s"]
        row["train_tok_s"] = res["warm-on-policy"]["train_tokens_per_s"]
        rows.append(row)
        write(rows, args)
    return 0


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else \
        f"{xs[0]:.4f}"


def write(rows: list[dict], args: argparse.Namespace) -> None:
    import csv

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    names = [("init", "start: off-policy forward-KL student, 120 steps"),
             ("warm-kd", f"+{args.steps} steps off-policy, forward KL"),
             ("warm-kd-reverse_kl", f"+{args.steps} steps off-policy, reverse KL"),
             ("warm-on-policy", f"+{args.steps} steps on-policy LAMBDA 0.5, reverse KL")]
    lines = [f"# On-policy KD from a warm student ({len(rows)} seeds)", "",
             f"Command: `flock /tmp/kdk_heavy.lock python bench/experiments/on_policy_warm.py "
             f"{' '.join(sys.argv[1:])}`; lr {args.lr:g}, warm-up 5 then cosine, otherwise the "
             "on-policy preset's options and metrics.", "",
             "| student | held-out CE | teacher NLL of own samples |", "|---|---|---|"]
    for key, label in names:
        lines.append(f"| {label} | {_ms([r[f'{key}_ce'] for r in rows])} | "
                     f"{_ms([r[f'{key}_nll'] for r in rows])} |")
    lines += ["", "| seed | " + " | ".join(k for k, _ in names) + " (held-out CE / teacher NLL)"
              " | wall s | gen tokens/s | train tokens/s |",
              "|---|" + "---|" * (len(names) + 3)]
    for r in rows:
        cells = " | ".join(f"{r[f'{k}_ce']:.4f} / {r[f'{k}_nll']:.4f}" for k, _ in names)
        lines.append(f"| {r['seed']} | {cells} | {r['wall_s']:.0f} | {r['gen_tok_s']:,.0f} | "
                     f"{r['train_tok_s']:,.0f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
