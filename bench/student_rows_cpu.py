"""Student-only row ops vs the dense row ops on CPU: student_stats + student_grad against
stats + grad over one [C, V] chunk (S1's whole chunk, 2048 x 32000), interleaved.

    python bench/student_rows_cpu.py [--impl cpp] [--rounds 7] [--threads 2] [--csv PATH]

Each round times every op once, in turn (grad in place over a fresh copy of the logits, as
the driver writes dL/dz over the chunk; the copy is not timed); the table gives the median
and best over rounds. Configurations: ``plain`` (T = 1, no CE: one exp per element per op)
and ``t2_ce`` (T = 2 with hard-label CE: the student ops keep a second softmax over the
untempered z). The student logits carry 64 masked (-inf) columns per row, as the sparse
teachers' driver masks the teacher's ids.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from kdkernels.backends import registry
from kdkernels.backends.base import RowSpec
from kdkernels.layouts import SCOEF, SSTATS
from kdkernels.row_stats import finish

SHAPE = (2048, 32000)
MASKED_PER_ROW = 64
CONFIGS = {"plain": dict(temperature=1.0), "t2_ce": dict(temperature=2.0)}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def _timed(fn, before=None) -> float:
    if before is not None:
        before()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _ops(impl: str, zs: torch.Tensor, zt: torch.Tensor, config: str):
    """name -> (fn, setup) for the four ops of one configuration."""
    be = registry.load(impl)
    if isinstance(be, str):
        raise SystemExit(f"backend {impl} unavailable: {be}")
    ce = config == "t2_ce"
    spec = RowSpec.build("forward_kl", has_ce=ce, **CONFIGS[config])
    c, v = zs.shape
    labels = torch.randint(0, v, (c,)) if ce else torch.full((c,), -1, dtype=torch.int64)
    zs_dense = torch.where(torch.isneginf(zs), torch.zeros((), dtype=zs.dtype), zs)
    t = finish(be.stats(zs_dense, zt, labels, spec))
    kd, ce_w = torch.full((c,), 1e-3), torch.full((c,), 1e-3 if ce else 0.0)
    coef = torch.stack((t.m_a, t.log_s_a, t.m_b, t.log_s_b, t.m_z, t.log_s_z,
                        torch.zeros(c), kd, ce_w), 1)
    s = be.student_stats(zs, spec)
    scoef = torch.empty(c, len(SCOEF))
    scoef[:, SCOEF.m_a], scoef[:, SCOEF.log_s_a] = s[:, SSTATS.m_a], s[:, SSTATS.s_a].log()
    scoef[:, SCOEF.m_z], scoef[:, SCOEF.log_s_z] = s[:, SSTATS.m_z], s[:, SSTATS.s_z].log()
    scoef[:, SCOEF.kd], scoef[:, SCOEF.ce] = kd, ce_w
    work_d, work_s = zs_dense.clone(), zs.clone()
    return {
        "dense stats": (lambda: be.stats(zs_dense, zt, labels, spec), None),
        "dense grad": (lambda: be.grad(work_d, zt, labels, coef, spec, work_d),
                       lambda: work_d.copy_(zs_dense)),
        "student_stats": (lambda: be.student_stats(zs, spec), None),
        "student_grad": (lambda: be.student_grad(work_s, labels, scoef, spec, work_s),
                         lambda: work_s.copy_(zs)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", default="cpp")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--csv", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = cpu_model()
    isa = torch.backends.cpu.get_cpu_capability()
    c, v = SHAPE
    print(f"{model} ({isa}); threads {args.threads}; {args.impl}; [{c} x {v}]; median (best) of "
          f"{args.rounds} interleaved rounds, ms")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        zs = (torch.randn(c, v, generator=gen) * 3).to(dtype)
        zt = (torch.randn(c, v, generator=gen) * 3).to(dtype)
        cols = torch.rand(c, v, generator=gen).argsort(1)[:, :MASKED_PER_ROW]
        zs.scatter_(1, cols, -math.inf)
        for config in args.configs:
            ops = _ops(args.impl, zs, zt, config)
            for fn, setup in ops.values():  # warm up
                _timed(fn, setup)
            times: dict[str, list[float]] = {name: [] for name in ops}
            for rnd in range(args.rounds):
                names = list(ops) if rnd % 2 == 0 else list(reversed(ops))
                for name in names:
                    fn, setup = ops[name]
                    times[name].append(_timed(fn, setup) * 1e3)
            med = {n: statistics.median(t) for n, t in times.items()}
            dense = med["dense stats"] + med["dense grad"]
            student = med["student_stats"] + med["student_grad"]
            print(f"{dname} {config}: " + "  ".join(
                f"{n} {med[n]:.1f} ({min(times[n]):.1f})" for n in ops)
                + f"  | student/dense {student / dense:.2f}")
            for n, t in times.items():
                rows.append(dict(cpu=model, isa=isa, threads=args.threads, impl=args.impl,
                                 rows=c, vocab=v, dtype=dname, config=config, op=n,
                                 ms_median=f"{med[n]:.2f}", ms_best=f"{min(t):.2f}",
                                 rounds=args.rounds))
            rows.append(dict(cpu=model, isa=isa, threads=args.threads, impl=args.impl, rows=c,
                             vocab=v, dtype=dname, config=config, op="student/dense (stats+grad)",
                             ms_median=f"{student / dense:.3f}", ms_best="",
                             rounds=args.rounds))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
