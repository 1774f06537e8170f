"""Prompt-masked distillation on CPU: the fused loss with the first part of every sequence
ignored, before/after two checkouts, one fresh process per run (peak = its max RSS).

    python bench/ignored_rows_cpu.py --before ../baseline --after . --shape S1 --dtype fp32

Labels: sequences of 512 tokens whose first ``--prompt-frac`` are ``ignore_index`` (the
common SFT-style mask). Rounds alternate which checkout goes first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, resource, statistics, sys, time
root, shape, dtype, frac, repeats = sys.argv[1:6]
sys.path.insert(0, root)
import torch
import kdkernels
from bench import common
inp = common.make_inputs(common.parse_shape(shape), common.DTYPES[dtype])
labels = inp.labels.view(-1, 512).clone()
labels[:, : int(512 * float(frac))] = common.IGNORE_INDEX
inp.labels = labels.view(-1)
times = []
for i in range(int(repeats) + 1):
    inp.clear_grads()
    t0 = time.perf_counter()
    kdkernels.fused_linear_kd_loss(*inp.tensors(), ignore_index=common.IGNORE_INDEX).backward()
    if i:
        times.append(time.perf_counter() - t0)
print(json.dumps({"ms": 1e3 * statistics.median(times),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--shape", default="S1")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--prompt-frac", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    got: dict[str, list[dict]] = {t: [] for t in trees}
    for rnd in range(args.rounds):
        for tag in (list(trees) if rnd % 2 == 0 else list(reversed(trees))):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(trees[tag]), args.shape,
                                  args.dtype, str(args.prompt_frac), str(args.repeats)],
                                 cwd=trees[tag], check=True, capture_output=True, text=True)
            got[tag].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {rnd} {tag}: {got[tag][-1]}", file=sys.stderr, flush=True)
    print("| checkout | ms (median of rounds) | peak MiB |")
    print("|---|---|---|")
    for tag, runs in got.items():
        print(f"| {tag} | {statistics.median(r['ms'] for r in runs):.0f} | "
              f"{max(r['peak_mib'] for r in runs):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
