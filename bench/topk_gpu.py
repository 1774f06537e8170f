"""GPU benchmark of the fused top-k loss (run by bench/gpu_check.sh when a GPU is lent):
fused top-k (bucket and zero tails, Triton backend) vs the student GEMM floor and the naive
top-k loss (materialised logits, log_softmax, gather), forward plus backward, median of
CUDA-event timings, peak allocated memory above the inputs. Writes OUT/gpu_topk.csv.

    python bench/topk_gpu.py --out OUT [--shapes S1 S2] [--dry-run]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.topk_cpu import make_teacher  # noqa: E402

PROVIDERS = ("floor", "topk_bucket", "topk_zero", "naive_topk")


def _run(provider: str, h, w, ids, lps):
    import kdkernels

    if provider == "floor":  # the three student GEMMs over the whole batch, bf16/fp32 out
        z = h.detach() @ w.detach().t()
        return z @ w.detach(), z.t() @ h.detach()
    if provider.startswith("topk"):
        loss = kdkernels.fused_linear_topk_kd_loss(h, w, ids, lps, tail=provider[5:],
                                                   impl="triton")
    else:
        logp = torch.log_softmax((h @ w.t()).float(), -1)
        lp_s = logp.gather(1, ids)
        loss = (lps.exp() * (lps - lp_s)).sum() / h.shape[0]
    loss.backward()
    return loss


def time_ms(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(stop))
    return out


def measure(provider: str, h, w, ids, lps, repeats: int) -> list[float]:
    def call():
        h.grad = w.grad = None
        return _run(provider, h, w, ids, lps)

    call()  # warm-up (Triton compiles)
    return time_ms(call, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", nargs="+", default=["S1", "S2"])
    p.add_argument("--dtype", default="bf16", choices=list(common.DTYPES))
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    rows = []
    for name in args.shapes:
        shape = common.parse_shape(name)
        for provider in PROVIDERS:
            row = dict(shape=name, dtype=args.dtype, k=args.k, provider=provider)
            if args.dry_run or not torch.cuda.is_available():
                rows.append({**row, "status": "dry-run"})
                continue
            torch.cuda.empty_cache()
            dt = common.DTYPES[args.dtype]
            gen = torch.Generator().manual_seed(0)
            h = (torch.randn(shape.n, shape.ds, generator=gen).to(dt).cuda()
                 .requires_grad_())
            w = ((torch.randn(shape.vocab, shape.ds, generator=gen) * shape.ds**-0.5).to(dt)
                 .cuda().requires_grad_())
            ids, lps = (t.cuda() for t in make_teacher(shape.n, shape.vocab, args.k, 0))
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                times = measure(provider, h, w, ids, lps, args.repeats)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                rows.append({**row, "status": "ok", "ms_median": statistics.median(times),
                             "peak_above_inputs_mib": round(peak, 1)})
            except torch.OutOfMemoryError:
                rows.append({**row, "status": "OOM"})
            del h, w, ids, lps
    floors = {r["shape"]: r.get("ms_median") for r in rows if r["provider"] == "floor"}
    for r in rows:
        if r.get("ms_median") and floors.get(r["shape"]):
            r["ratio_to_floor"] = round(r["ms_median"] / floors[r["shape"]], 3)
    out = Path(args.out) / "gpu_topk.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = ["shape", "dtype", "k", "provider", "status", "ms_median", "ratio_to_floor",
            "peak_above_inputs_mib"]
    with open(out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=cols)
        wr.writeheader()
        wr.writerows({c: r.get(c) for c in cols} for r in rows)
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
