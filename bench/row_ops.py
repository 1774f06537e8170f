"""The row-op benchmark: the backends' row passes alone over one [C, V] chunk of logits,
against memory copies (no GEMMs, no driver).

    python bench/row_ops.py [--impl cpp torch] [--shapes S1 S2-chunk] [--rounds 5] [--csv PATH]
    python bench/row_ops.py --device cuda --out DIR [--sweep]          # DIR/gpu_rowops.csv

CPU: the dense ops (stats, grad) and the sparse teachers' student-only ops (student_stats,
student_grad) of every ``--impl``, beside a plain copy and a ``torch.exp`` pass of the same
chunk, interleaved over ``--rounds`` rounds (the order alternates); median and best ms, and
the effective bandwidth (the bytes each op must move / its median). grad runs in place over
a fresh copy of the logits (as the driver writes dL/dz over the chunk; the copy is not
timed). Configurations: ``plain`` (T = 1, no CE: one exp per element per op) and ``t2_ce``
(T = 2 with hard-label CE: the student ops keep a second softmax over the untempered z).
The student logits carry 64 masked (-inf) columns per row, as the sparse teachers' driver
masks the teacher's ids. It imports kdkernels from the path (PYTHONPATH), so one copy of it
times any checkout.

CUDA: the Triton row kernels (stats, grad; JSD's mix) at their default configs, and a
BLOCK_V x warps sweep, timed with triton.testing.do_bench against a measured device copy
(bench/loss.py --device cuda runs them first, in the same process as the loss benchmark).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench import harness  # noqa: E402

SHAPES = {"S1": (2048, 32000), "S2-chunk": (523, 128256)}  # S1's whole chunk; one S2 chunk
MASKED_PER_ROW = 64
CONFIGS = {"plain": dict(temperature=1.0), "t2_ce": dict(temperature=2.0)}
GIB = 2**30
# CUDA sweep at the driver's chunk: OVERRIDE settings of kdkernels.backends.triton_rows.
ROW_SWEEP = (dict(block_v=1024, num_warps=4), dict(block_v=2048, num_warps=4),
             dict(block_v=4096, num_warps=8), dict(block_v=4096, num_warps=16),
             dict(block_v=8192, num_warps=16), dict(programs_per_sm=4),
             dict(programs_per_sm=16), dict(n_split=1))


def chunk_shape(text: str) -> tuple[int, int]:
    """A name of SHAPES or 'C,V'."""
    if text in SHAPES:
        return SHAPES[text]
    c, v = (int(x) for x in text.split(","))
    return c, v


def dense_coef(stats: torch.Tensor, kd: float, ce: float) -> torch.Tensor:
    """[C, len(COEF)] gradient coefficients from a chunk's own stats (the full-row
    normalisers when the chunk spans the vocabulary); aux 0."""
    from kdkernels.layouts import COEF
    from kdkernels.row_stats import finish

    t = finish(stats)
    coef = torch.zeros(stats.shape[0], len(COEF), device=stats.device)
    for name in ("m_a", "log_s_a", "m_b", "log_s_b", "m_z", "log_s_z"):
        coef[:, getattr(COEF, name)] = getattr(t, name)
    coef[:, COEF.kd], coef[:, COEF.ce] = kd, ce
    return coef


# ---- CPU --------------------------------------------------------------------------------------

Op = tuple[Callable[[], object], Callable[[], object] | None, int]  # (fn, untimed setup, bytes)


def cpu_ops(impl: str, zs: torch.Tensor, zt: torch.Tensor, config: str, divergence: str
            ) -> dict[str, Op]:
    """name -> op for one backend: dense stats + grad over the unmasked logits, student
    stats + grad over the masked ones."""
    from kdkernels.backends import registry
    from kdkernels.backends.base import RowSpec
    from kdkernels.layouts import SCOEF, SSTATS

    be = registry.load(impl)
    if isinstance(be, str):
        raise SystemExit(f"backend {impl} unavailable: {be}")
    ce = config == "t2_ce"
    spec = RowSpec.build(divergence, has_ce=ce, **CONFIGS[config])
    c, v = zs.shape
    nbytes = zs.numel() * zs.element_size()
    labels = torch.randint(0, v, (c,)) if ce else torch.full((c,), -1, dtype=torch.int64)
    zs_dense = torch.where(torch.isneginf(zs), torch.zeros((), dtype=zs.dtype), zs)
    coef = dense_coef(be.stats(zs_dense, zt, labels, spec), 1e-3, 1e-3 if ce else 0.0)
    work_d = zs_dense.clone()
    ops: dict[str, Op] = {
        f"{impl} stats": (lambda: be.stats(zs_dense, zt, labels, spec), None, 2 * nbytes),
        f"{impl} grad": (lambda: be.grad(work_d, zt, labels, coef, spec, work_d),
                         lambda: work_d.copy_(zs_dense), 3 * nbytes),
    }
    if be.student_stats is None:
        return ops
    s = be.student_stats(zs, spec)
    scoef = torch.empty(c, len(SCOEF))
    scoef[:, SCOEF.m_a], scoef[:, SCOEF.log_s_a] = s[:, SSTATS.m_a], s[:, SSTATS.s_a].log()
    scoef[:, SCOEF.m_z], scoef[:, SCOEF.log_s_z] = s[:, SSTATS.m_z], s[:, SSTATS.s_z].log()
    scoef[:, SCOEF.kd], scoef[:, SCOEF.ce] = 1e-3, 1e-3 if ce else 0.0
    work_s = zs.clone()
    ops[f"{impl} student_stats"] = (lambda: be.student_stats(zs, spec), None, nbytes)
    ops[f"{impl} student_grad"] = (
        lambda: be.student_grad(work_s, labels, scoef, spec, work_s),
        lambda: work_s.copy_(zs), 2 * nbytes)
    return ops


def _timed(op: Op) -> float:
    fn, setup, _ = op
    if setup is not None:
        setup()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run_cpu(args: argparse.Namespace) -> list[dict]:
    where = harness.machine()
    print(f"{where}; threads {torch.get_num_threads()}; {args.divergence}; median (best) of "
          f"{args.rounds} interleaved rounds, ms")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for sname in args.shapes:
            c, v = chunk_shape(sname)
            zs = (torch.randn(c, v, generator=gen) * 3).to(dtype)
            zt = (torch.randn(c, v, generator=gen) * 3).to(dtype)
            cols = torch.rand(c, v, generator=gen).argsort(1)[:, :MASKED_PER_ROW]
            zs.scatter_(1, cols, -math.inf)
            nbytes = zs.numel() * zs.element_size()
            dst, zf, ef = torch.empty_like(zs), zs.float(), torch.empty(c, v)
            for config in args.configs:
                ops: dict[str, Op] = {
                    "copy": (lambda d=dst, z=zs: d.copy_(z), None, 2 * nbytes),
                    "exp fp32": (lambda z=zf, e=ef: torch.exp(z, out=e), None, 8 * c * v)}
                for impl in args.impl:
                    ops.update(cpu_ops(impl, zs, zt, config, args.divergence))
                for op in ops.values():  # warm up
                    _timed(op)
                times: dict[str, list[float]] = {name: [] for name in ops}
                for rnd in range(args.rounds):
                    for name in harness.round_order(list(ops), rnd):
                        times[name].append(_timed(ops[name]))
                med = {n: statistics.median(t) for n, t in times.items()}
                print(f"{dname} {sname} [{c} x {v}] {config}: " + "  ".join(
                    f"{n} {med[n]:.1f} ({min(times[n]):.1f})" for n in ops))
                base = dict(machine=where, threads=torch.get_num_threads(),
                            divergence=args.divergence, rows=c, vocab=v, dtype=dname,
                            config=config, rounds=args.rounds)
                for n, t in times.items():
                    rows.append(dict(base, op=n, ms_median=f"{med[n]:.2f}",
                                     ms_best=f"{min(t):.2f}",
                                     gb_per_s=f"{ops[n][2] / med[n] / 1e6:.1f}",
                                     x_exp=f"{med[n] / med['exp fp32']:.2f}"))
                for impl in args.impl:
                    if f"{impl} student_stats" not in med:
                        continue
                    dense = med[f"{impl} stats"] + med[f"{impl} grad"]
                    student = med[f"{impl} student_stats"] + med[f"{impl} student_grad"]
                    print(f"  {impl}: stats+grad {dense:.1f} ms = {dense / med['exp fp32']:.1f}"
                          f" exp passes; student/dense {student / dense:.2f}")
                    rows.append(dict(base, op=f"{impl} student/dense (stats+grad)",
                                     ms_median=f"{student / dense:.3f}", ms_best="",
                                     gb_per_s="", x_exp=""))
    return rows


# ---- CUDA -------------------------------------------------------------------------------------

@dataclass
class RowOpRow:
    what: str  # stats | grad | mix | copy
    divergence: str
    rows: int
    vocab: int
    logits: str
    out: str
    block_v: int | str
    num_warps: int | str
    n_split: int | str
    config: str = "default"  # default (the backend's heuristic) | the sweep's OVERRIDE
    us: float | None = None
    gbytes: float | None = None
    tb_per_s: float | None = None
    of_copy: float | None = None
    status: str = "ok"


def _free() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy of 2 GiB (read + write counted)."""
    from triton.testing import do_bench

    src = torch.empty(GIB, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    src = dst = None  # free before the next measurement
    _free()
    return 2 * GIB / (ms * 1e-3)


def _config_name(config: dict | None) -> str:
    return "default" if not config else " ".join(f"{k}={v}" for k, v in config.items())


def cuda_row_ops(copy_bps: float, deadline: float, vocab: int, chunk: int, sweep: bool,
                 default: bool = True, device: str = "cuda", layout: str = "own"
                 ) -> list[RowOpRow]:
    """Stats and grad kernels alone on a [chunk, vocab] fp32-logit workspace with bf16 dL/dz
    laid out as the driver does (``layout`` "packed": over the fp32 logits, which the timed
    grad calls then overwrite: times do not depend on the values; "own": its own buffer),
    forward KL; and JSD's mix pass; plus a BLOCK_V x warps sweep when asked. Bytes are what
    the kernels must move: stats and mix read zs and zt, grad reads both and writes dz."""
    from triton.testing import do_bench

    from kdkernels.backends import triton_rows
    from kdkernels.backends.base import RowSpec
    from kdkernels.row_stats import finish, norms

    out_rows: list[RowOpRow] = []
    zs = torch.randn(chunk, vocab, device=device) * 2
    zt = torch.randn(chunk, vocab, device=device) * 2
    dz = (zs.view(torch.bfloat16)[:, :vocab] if layout == "packed"
          else torch.empty(chunk, vocab, device=device, dtype=torch.bfloat16))
    labels = torch.full((chunk,), -1, device=device, dtype=torch.int64)
    logit_bytes = chunk * vocab * (zs.element_size() + zt.element_size())
    configs = ([None] if default else []) + (list(ROW_SWEEP) if sweep else [])
    for config in configs:
        if time.monotonic() > deadline:
            break
        triton_rows.OVERRIDE.clear()
        triton_rows.OVERRIDE.update(config or {})
        plan = triton_rows._plan(chunk, vocab, zs.device, 4)
        for div in ("forward_kl", "jsd") if config is None else ("forward_kl",):
            spec = RowSpec.build(div)
            try:
                stats = triton_rows.stats(zs, zt, labels, spec)
                coef = dense_coef(stats, 1.0, 0.0)
                jobs = [("stats", lambda s=spec: triton_rows.stats(zs, zt, labels, s),
                         logit_bytes),
                        ("grad", lambda s=spec, c=coef: triton_rows.grad(zs, zt, labels, c, s,
                                                                          dz),
                         logit_bytes + dz.numel() * dz.element_size())]
                if div == "jsd":
                    nrm = norms(finish(stats))
                    jobs = [("mix", lambda s=spec, n=nrm: triton_rows.mix(zs, zt, n, s),
                             logit_bytes)]
                for what, fn, nbytes in jobs:
                    ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
                    bps = nbytes / (ms * 1e-3)
                    out_rows.append(RowOpRow(what, div, chunk, vocab, "fp32", f"bf16 {layout}",
                                             plan.block_v, plan.num_warps, plan.n_split,
                                             _config_name(config),
                                             ms * 1e3, nbytes / 1e9, bps / 1e12,
                                             bps / copy_bps))
            except Exception as err:
                traceback.print_exc()
                out_rows.append(RowOpRow("stats+grad", div, chunk, vocab, "fp32", "bf16",
                                         plan.block_v, plan.num_warps, plan.n_split,
                                         _config_name(config),
                                         status=f"{type(err).__name__}: {err}"[:200]))
    triton_rows.OVERRIDE.clear()
    zs = zt = dz = None  # free before the next measurement
    if device == "cuda":
        _free()
    return out_rows


def write_rows_csv(path: Path, rows: list, cls: type) -> None:
    """Dataclass rows, one column per field of ``cls``."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(cls)])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def run_cuda(args: argparse.Namespace) -> int:
    from bench import common

    if not torch.cuda.is_available():
        print("row_ops: no CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    bps = copy_bandwidth()
    print(f"copy bandwidth {bps / 1e12:.2f} TB/s", flush=True)
    shape = common.SHAPES["liger"]
    plan = common.floor_plan(common.make_inputs(shape, torch.bfloat16, "cuda"), impl="triton")
    ops = cuda_row_ops(bps, deadline, shape.vocab, plan.chunk, sweep=args.sweep,
                       layout=plan.dz_layout)
    write_rows_csv(args.out / "gpu_rowops.csv", ops, RowOpRow)
    for o in ops:
        print(o)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--impl", nargs="+", default=["cpp"], help="CPU backends to time")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--divergence", default="forward_kl")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES),
                    help=f"CPU: {', '.join(SHAPES)} or C,V (rows, vocabulary)")
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="CUDA: folder for gpu_rowops.csv")
    ap.add_argument("--sweep", action="store_true", help="CUDA: the BLOCK_V x warps sweep")
    ap.add_argument("--budget-s", type=float, default=120.0, help="CUDA: time budget")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        if args.out is None:
            ap.error("--device cuda needs --out DIR")
        return run_cuda(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_cpu(args)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
