"""Row ops alone on CPU: cpp (and torch) stats + grad over one [C, V] chunk vs memory copies.

    python bench/row_ops_cpu.py [--impl cpp torch] [--reps 3] [--threads 2] [--shapes S1]

It imports kdkernels from the path (PYTHONPATH), so one copy of it times any checkout.

Prints ms per pass and the effective bandwidth (bytes each pass must move / time) next to a
plain copy of the same bytes. Shapes: S1's whole chunk (2048 x 32000) and one S2 chunk
(523 x 128256 at bf16: the chunk of the former 256 MiB default workspace).
"""

from __future__ import annotations

import argparse
import time

import torch

from kdkernels.backends import registry
from kdkernels.backends.base import RowSpec
from kdkernels.row_stats import finish

SHAPES = {"S1": (2048, 32000), "S2-chunk": (523, 128256)}


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _shape(sname: str, c: int, v: int, dtype: torch.dtype, impls, spec, reps: int) -> None:
    zs = (torch.randn(c, v) * 3).to(dtype)
    zt = (torch.randn(c, v) * 3).to(dtype)
    labels = torch.full((c,), -1, dtype=torch.int64)
    nbytes = zs.numel() * zs.element_size()
    dst = torch.empty_like(zs)
    t_copy = _best(lambda: dst.copy_(zs), reps)  # read 1 + write 1
    zf, ef = zs.float(), torch.empty(c, v)
    t_exp = _best(lambda: torch.exp(zf, out=ef), reps)  # the exp ceiling
    print(f"{sname} {dtype} [{c} x {v}]: copy {t_copy * 1e3:.1f} ms = "
          f"{2 * nbytes / t_copy / 1e9:.1f} GB/s; torch.exp fp32 {t_exp * 1e3:.1f} ms = "
          f"{c * v / t_exp / 1e9:.2f} G/s")
    for impl in impls:
        be = registry.load(impl)
        t = finish(be.stats(zs, zt, labels, spec))
        coef = torch.stack((t.m_a, t.log_s_a, t.m_b, t.log_s_b, t.m_z, t.log_s_z,
                            torch.zeros(c), torch.full((c,), 1e-3), torch.zeros(c)), 1)
        work = zs.clone()
        t_stats = _best(lambda: be.stats(zs, zt, labels, spec), reps)  # noqa: B023
        t_grad = _best(lambda: be.grad(work, zt, labels, coef, spec, work), reps)  # noqa: B023
        print(f"  {impl:6s} stats {t_stats * 1e3:7.1f} ms ({2 * nbytes / t_stats / 1e9:5.1f} GB/s, "
              f"{c * v / t_stats / 1e9:.2f} G logits/s)  grad {t_grad * 1e3:7.1f} ms "
              f"({3 * nbytes / t_grad / 1e9:5.1f} GB/s)  total {(t_stats + t_grad) * 1e3:7.1f} ms"
              f" = {(t_stats + t_grad) / t_exp:.1f} torch.exp passes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", nargs="+", default=["cpp"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--divergence", default="forward_kl")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = RowSpec.build(args.divergence)
    print(f"threads {torch.get_num_threads()}; {args.divergence}; best of {args.reps}")
    for dname in args.dtypes:
        for sname in args.shapes:
            c, v = SHAPES[sname]
            _shape(sname, c, v, getattr(torch, dname), args.impl, spec, args.reps)


if __name__ == "__main__":
    main()
