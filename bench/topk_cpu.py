"""CPU benchmark of the sparse-teacher (top-k) loss, forward plus backward, side by side.

    python bench/topk_cpu.py --shape S1 --dtype both --csv bench/results/cpu/topk_S1.csv

Providers, each timed in its own process (so that its peak RSS is its own), interleaved over
``--rounds`` rounds so that the machine's drift hits them alike:

    floor        the three student GEMMs of the fused top-k loss (logits, grad_hidden,
                 grad_weight), chunked exactly as the loss chunks them (the same planner)
    topk_zero    kdkernels.fused_linear_topk_kd_loss, tail="zero" (the peers' math)
    topk_bucket  the same with tail="bucket" (the default)
    topk_bucket_jsd  tail="bucket", divergence="jsd": the generic rule of the non-KL
                 divergences (tails.py), which differs from topk_bucket only in [C, K] math
    naive_topk   the peers' way: materialised [N, V] student logits, log_softmax, gather
                 at the teacher's ids, sum q (log q - log p) (= tail "zero")
    dense_fused  kdkernels.fused_linear_kd_loss against a dense teacher of Dt hidden size

All but topk_bucket_jsd use forward KL at T = 1 with K teacher ids per token. Reported: the
median time, the peak RSS above the inputs (VmHWM after the calls minus VmRSS once the inputs
exist), the ratio to the floor measured in the same run, and the loss (topk_zero and
naive_topk must agree).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench import common  # noqa: E402

PROVIDERS = ("floor", "topk_zero", "topk_bucket", "naive_topk", "dense_fused")
EXTRA = ("topk_bucket_jsd",)  # not in the default run; --providers names it


def make_teacher(n: int, vocab: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K distinct ids per row (a strided walk from a random start, no [N, V] temporary) and
    log-probs of a random distribution over them covering 90% of the mass."""
    gen = torch.Generator().manual_seed(seed + 1)
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    stride = max(1, vocab // k - 1)
    while math.gcd(stride, vocab) != 1:
        stride -= 1  # coprime with vocab: the walk never revisits an id
    ids = (start + torch.arange(k)[None] * stride) % vocab
    logits = torch.randn(n, k, generator=gen) * 2
    lps = torch.log_softmax(logits, -1) + torch.log(torch.tensor(0.9))
    return ids, lps


def _rss(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _floor(inputs: common.Inputs, ids: torch.Tensor):
    from kdkernels.backends import registry
    from kdkernels.backends.base import RowSpec
    from kdkernels.engine import gemm
    from kdkernels.engine.chunking import plan_chunks
    from kdkernels.options import DEFAULT_MAX_WORKSPACE_BYTES

    h, w = inputs.student_hidden, inputs.student_weight
    cd = gemm.compute_dtype(h.dtype, h.device)
    zs_dtype = gemm.logits_dtype(cd, h.device)
    backend = registry.select("auto", h.device, zs_dtype, RowSpec.build("forward_kl"),
                              student_only=True)
    plan = plan_chunks(n_rows=h.shape[0], width=w.shape[0], backend=backend,
                       logits_dtype=zs_dtype, grad_dtype=cd, device=h.device,
                       budget=DEFAULT_MAX_WORKSPACE_BYTES, student_only=True)

    def run(_inputs):
        wc = w.detach().to(cd)
        hd = h.detach().to(cd)
        zs = torch.empty(plan.rows, w.shape[0], dtype=zs_dtype)
        dz = zs if plan.dz_layout == "in_place" else torch.empty(plan.rows, w.shape[0],
                                                                 dtype=cd)
        gh = torch.empty_like(hd)
        gw = torch.zeros(w.shape, dtype=torch.float32)
        for s in range(0, h.shape[0], plan.rows):
            e = min(h.shape[0], s + plan.rows)
            z = gemm.logits_into(hd[s:e], wc, None, zs[: e - s])
            d = dz[: e - s] if dz is not zs else z
            if d is not z:
                d.copy_(z)
            torch.mm(d, wc, out=gh[s:e])
            gemm.accumulate_matmul_(gw, d.t(), hd[s:e])
        return None

    return run, f"chunk {plan.rows} rows, dz {plan.dz_layout}, as impl={backend.name}"


def build(name: str, inputs: common.Inputs, ids, lps):
    import kdkernels

    h, w = inputs.student_hidden, inputs.student_weight
    if name == "floor":
        return _floor(inputs, ids)
    if name in ("topk_zero", "topk_bucket", "topk_bucket_jsd"):
        tail = name.split("_")[1]
        divergence = "jsd" if name.endswith("_jsd") else "forward_kl"

        def run(_inputs):
            loss = kdkernels.fused_linear_topk_kd_loss(h, w, ids, lps, tail=tail,
                                                       divergence=divergence)
            loss.backward()
            return loss
        return run, ""
    if name == "naive_topk":
        def run(_inputs):
            logp = torch.log_softmax((h @ w.t()).float(), -1)
            lp_s = logp.gather(1, ids)
            lq = lps
            loss = (lq.exp() * (lq - lp_s)).sum() / h.shape[0]
            loss.backward()
            return loss
        return run, ""
    if name == "dense_fused":
        g, u = inputs.teacher_hidden, inputs.teacher_weight

        def run(_inputs):
            loss = kdkernels.fused_linear_kd_loss(h, w, g, u)
            loss.backward()
            return loss
        return run, f"teacher Dt {g.shape[1]}"
    raise ValueError(f"unknown provider {name!r}; choose from "
                     f"{', '.join(PROVIDERS + EXTRA)}")


def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = common.parse_shape(args.shape)
    inputs = common.make_inputs(shape, common.DTYPES[args.dtype], "cpu", args.seed)
    if args.worker != "dense_fused":  # the teacher's tensors are not an input of the others
        inputs.teacher_hidden = inputs.teacher_weight = None
    ids, lps = make_teacher(shape.n, shape.vocab, args.k, args.seed)
    base = _rss("VmRSS")
    run, note = build(args.worker, inputs, ids, lps)
    for _ in range(args.warmup):
        inputs.student_hidden.grad = inputs.student_weight.grad = None
        run(inputs)
    times, loss = [], None
    for _ in range(args.repeats):
        inputs.student_hidden.grad = inputs.student_weight.grad = None
        t0 = time.perf_counter()
        out = run(inputs)
        times.append((time.perf_counter() - t0) * 1e3)
        loss = None if out is None else float(out)
    return dict(times_ms=times, loss=loss, peak_above_inputs_mib=_rss("VmHWM") - base,
                inputs_mib=base, note=note)


def spawn(provider: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--worker", provider, "--result", out,
           "--shape", args.shape, "--dtype", args.dtype, "--k", str(args.k),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--seed", str(args.seed), "--threads", str(args.threads or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    try:
        if proc.returncode != 0:
            status = "OOM" if proc.returncode in (-9, 137) else "error"
            return dict(status=status, error=proc.stderr[-2000:], times_ms=[])
        return dict(status="ok", **json.loads(Path(out).read_text()))
    finally:
        os.unlink(out)


def machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in text.splitlines()
                    if ln.startswith("Model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="S1")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "both"])
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--csv", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return 0
    rows = []
    for dtype in (["bf16", "fp32"] if args.dtype == "both" else [args.dtype]):
        args.dtype = dtype
        got: dict[str, list[dict]] = {name: [] for name in args.providers}
        for r in range(args.rounds):
            order = args.providers if r % 2 == 0 else list(reversed(args.providers))
            for name in order:
                print(f"[{args.shape} {dtype}] round {r + 1}: {name}", file=sys.stderr)
                got[name].append(spawn(name, args))
        floor = None
        for name in args.providers:
            runs = got[name]
            times = [t for run in runs for t in run.get("times_ms", [])]
            ok = [run for run in runs if run["status"] == "ok"]
            med = statistics.median(times) if times else None
            if name == "floor":
                floor = med
            rows.append(dict(
                shape=args.shape, dtype=dtype, k=args.k, provider=name,
                status=ok and "ok" or runs[0]["status"],
                ms_median=None if med is None else round(med, 1),
                ratio_to_floor=None if med is None or not floor else round(med / floor, 3),
                peak_above_inputs_mib=None if not ok else round(max(
                    run["peak_above_inputs_mib"] for run in ok), 1),
                loss=None if not ok else ok[0]["loss"], note=ok[0]["note"] if ok else
                runs[0].get("error", "")[-300:].replace("\n", " "),
                machine=machine()))
    cols = list(rows[0])
    print("| " + " | ".join(cols[:-1]) + " |")
    print("|" + "---|" * (len(cols) - 1))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols[:-1]) + " |")
    print(f"machine: {rows[0]['machine']}")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=cols)
            wr.writeheader()
            wr.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
