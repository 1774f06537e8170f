"""The loss benchmark's CUDA path (bench/loss.py --device cuda): one process, bf16 by
default, providers side by side; and, first, the Triton row kernels' bandwidth against a
measured copy (bench/row_ops.py's CUDA part).

    python bench/loss.py --device cuda --out DIR [--dry-run] [--shape liger v32k] [--budget-s 170]
    python bench/loss.py --device cuda --loss topk --out DIR [--shape S1 S2]

Dense loss: forward KL(teacher || student), T = 1, mean over tokens (bench/common.py
KD_OPTIONS), gradients w.r.t. the student hidden states and head. Times are
triton.testing.do_bench medians (L2 flushed between calls); peaks are
torch.cuda.max_memory_allocated over one steady-state call, inputs included (`extra` = peak
minus what was allocated before it). Order (priority when the --budget-s runs short): copy
bandwidth, row kernels at their default configs, the Liger shape's providers, the
row-kernel config sweep, the other shapes. Every provider runs in try/except: an OOM or an
error is a row in the table, not the end. At the Liger shape, one extra call of `floor` and
`kdk-triton` runs under the CUDA allocator's recorder; summary.txt lists what is live at
each one's memory peak (`peak of` lines: size and the allocating kdkernels/bench line), so a
peak over the model is explained in the same run. Writes DIR/gpu_bench.csv,
DIR/gpu_rowops.csv, DIR/gpu_env.json and DIR/summary.txt, and prints the summary table last.

Top-k loss: bench/topk.py's providers (Triton backend) with the same timer; peak allocated
above the inputs; DIR/gpu_topk.csv.

--dry-run needs no GPU: it discovers the providers, writes the CSVs with status "dry-run"
and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import common, harness, row_ops, topk
from bench.row_ops import RowOpRow

GPU_SHAPES = ("liger", "v32k", "v152k", "v262k")  # common.SHAPES: Liger's first
# Run order = priority when the time budget runs short.
PROVIDERS = ("floor", "kdk-triton", "kdk-cuda", "trl", "liger-jsd", "naive", "floor-ws",
             "kdk-triton-ws", "liger-chunked", "kdk-torch")
LIGER_SHAPE_ONLY = ("floor-ws", "kdk-triton-ws")
LIGER_COMPILED_SHAPES = ("liger",)  # torch.compile costs ~20 s per vocabulary: once only
# kdk-triton-ws / floor-ws: a second workspace budget beside the default (KDK_BENCH_WS bytes)
BIG_WORKSPACE = int(os.environ.get("KDK_BENCH_WS", 256 * 2**20))
TARGETS = dict(floor_ratio=1.25, peak_gb=4.0, vs_liger=1.6, bandwidth=0.75)
GIB = 2**30
# Providers whose memory peak is taken apart at the liger shape (summary.txt shows it).
BREAKDOWN_PROVIDERS = ("floor", "kdk-triton")
BREAKDOWN: list[str] = []


@dataclass
class Row:
    shape: str
    provider: str
    status: str = "ok"  # ok | OOM | error | skipped | dry-run
    ms: float | None = None
    x_floor: float | None = None
    peak_gib: float | None = None
    extra_gib: float | None = None
    loss: float | None = None
    loss_rel_diff: float | None = None  # vs the naive fp32 loss (else kdk-torch)
    grad_h_rel_diff: float | None = None
    note: str = ""


# ---- providers ------------------------------------------------------------------------------

def _liger_jsd():
    from liger_kernel.transformers import LigerFusedLinearJSD

    # jsd_beta=0 is forward KL(teacher || student) in Liger's generalised JSD.
    module = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=common.IGNORE_INDEX,
                                 temperature=1.0)

    def run(inp: common.Inputs) -> torch.Tensor:
        loss = module(inp.student_hidden, inp.student_weight, inp.teacher_hidden,
                      inp.teacher_weight, inp.labels)
        loss.backward()
        return loss.detach()

    return run


def build(provider: str, shape_name: str, inputs: common.Inputs):
    """(run(inputs) -> loss or None, note). The floors' notes (their chunk) come after their
    first call: common.Floor reads the chunking from the driver's own calls."""
    if provider in ("floor", "floor-ws"):
        ws = BIG_WORKSPACE if provider == "floor-ws" else None
        return common.build_floor(inputs, impl="triton", max_workspace_bytes=ws), ""
    if provider == "kdk-triton-ws":
        return (common.kdkernels_provider("triton", BIG_WORKSPACE),
                f"max_workspace_bytes={BIG_WORKSPACE >> 20} MiB")
    if provider in ("kdk-triton", "kdk-cuda", "kdk-torch"):
        return common.kdkernels_provider(provider[4:]), ""
    if provider == "naive":
        return common.build_provider("naive", inputs), "full fp32 logits, log_softmax, kl_div"
    if provider == "liger-chunked":
        compiled = shape_name in LIGER_COMPILED_SHAPES
        name = "liger-compiled" if compiled else "liger"
        return common.build_provider(name, inputs), ("LigerFusedLinearJSDLoss(beta=0) "
                                                     + ("compiled" if compiled else "eager"))
    if provider == "liger-jsd":
        return _liger_jsd(), "LigerFusedLinearJSD(jsd_beta=0)"
    if provider == "trl":
        return (common.build_provider("trl", inputs),
                "trl _chunked_divergence_loss(beta=0): DistillationTrainer's Triton kernel")
    raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")


def discover(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """provider -> '' if it can run here, else why not."""
    from kdkernels.backends import registry
    from kdkernels.backends.base import RowSpec
    from kdkernels.engine import gemm
    from kdkernels.options import KDOptions

    spec = RowSpec.from_options(KDOptions(**common.KD_OPTIONS), True)
    logits = gemm.logits_dtype(dtype, device) if device.type == "cuda" else torch.float32
    why = {}
    for provider in PROVIDERS:
        reasons: list[str] = []
        if provider.startswith(("kdk-", "floor")):
            impl = "triton" if provider.startswith("floor") or provider.endswith("ws") \
                else provider[4:]
            reasons = registry.reasons(impl, device, logits, spec)
        elif provider.startswith("liger"):
            if importlib.util.find_spec("liger_kernel") is None:
                reasons = ["liger_kernel is not installed"]
        elif provider == "trl":
            why_not = common.trl_missing()
            reasons = [why_not] if why_not else []
        if not torch.cuda.is_available() and not any("CUDA" in r for r in reasons):
            reasons = reasons + ["no CUDA device"]
        why[provider] = "; ".join(reasons)
    return why


# ---- timing ---------------------------------------------------------------------------------

def _bench_ms(fn, budget_ms: float) -> float:
    """do_bench median with warmup/rep sized to the call's own time (>= 5 timed calls)."""
    from triton.testing import do_bench

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max(1e-3, (time.perf_counter() - t0) * 1e3)
    rep = max(5 * est, min(budget_ms, 20 * est))
    return float(do_bench(fn, warmup=est, rep=rep, return_mode="median"))


def _where(frames) -> str:
    """The innermost kdkernels / bench frame of an allocation's Python stack."""
    for f in frames:
        name = str(f.get("filename", ""))
        if "kdkernels" in name or "/bench/" in name:
            return f"{Path(name).name}:{f.get('line')} {f.get('name')}"
    return "?"


def live_at_peak(events: list[dict]) -> tuple[int, list[tuple[int, str]]]:
    """Replay one device's CUDA allocator trace (torch.cuda.memory._snapshot()
    ['device_traces'][i]): the peak of bytes allocated during the trace, and the blocks live
    at that peak, largest first, with where they were allocated. Blocks allocated before the
    trace began are not counted."""
    live: dict[int, tuple[int, str]] = {}
    cur = peak = 0
    at_peak: list[tuple[int, str]] = []
    for ev in events:
        action = ev.get("action")
        if action == "alloc":
            live[ev["addr"]] = (int(ev["size"]), _where(ev.get("frames") or ()))
            cur += int(ev["size"])
            if cur > peak:
                peak, at_peak = cur, list(live.values())
        elif action == "free_requested" and ev.get("addr") in live:
            cur -= live.pop(ev["addr"])[0]
    return peak, sorted(at_peak, reverse=True)


def peak_breakdown(label: str, call, top: int = 8) -> list[str]:
    """One call under the allocator's recorder: what is live at its memory peak, beyond
    what was allocated before (the inputs)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=100_000, context="alloc",
                                             stacks="python")
    try:
        call()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, blocks = live_at_peak(snap["device_traces"][torch.cuda.current_device()])
    lines = [f"peak of {label}: {before / GIB:.3f} GiB before the call + {peak / GIB:.3f} GiB "
             f"= {(before + peak) / GIB:.3f} GiB ({(before + peak) / 1e9:.2f} GB); live then:"]
    lines += [f"  {size / GIB:7.3f} GiB  {where}" for size, where in blocks[:top]]
    rest = sum(size for size, _ in blocks[top:])
    if rest:
        lines.append(f"  {rest / GIB:7.3f} GiB  ({len(blocks) - top} smaller blocks)")
    return lines


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def make_gpu_inputs(shape: common.Shape, dtype: torch.dtype, seed: int = 0,
                    device: str = "cuda") -> common.Inputs:
    """common.make_inputs' distributions, drawn on the GPU (a CPU draw of a 2 GiB head
    would cost seconds per shape)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(rows, cols, std):
        return torch.randn(rows, cols, generator=gen, device=device, dtype=dtype).mul_(std)

    h = randn(shape.n, shape.ds, 1.0).requires_grad_(True)
    w = randn(shape.vocab, shape.ds, shape.ds ** -0.5).requires_grad_(True)
    g = randn(shape.n, shape.dt, 1.0)
    u = randn(shape.vocab, shape.dt, shape.dt ** -0.5)
    labels = torch.randint(0, shape.vocab, (shape.n,), generator=gen, device=device)
    return common.Inputs(h, w, g, u, labels)


def bench_shape(shape_name: str, providers: list[str], why: dict[str, str], deadline: float,
                dtype: torch.dtype) -> list[Row]:
    shape = common.parse_shape(shape_name)
    _free()
    inputs = make_gpu_inputs(shape, dtype)
    rows, grads = [], {}
    for provider in providers:
        row = Row(shape_name, provider)
        rows.append(row)
        if why.get(provider):
            row.status, row.note = "skipped", why[provider]
            continue
        left_ms = (deadline - time.monotonic()) * 1e3
        if left_ms < 8e3:
            row.status, row.note = "skipped", "time budget spent"
            continue
        _free()
        base = torch.cuda.memory_allocated()
        try:
            run, row.note = build(provider, shape_name, inputs)

            def call(run=run):
                inputs.clear_grads()
                return run(inputs)

            call()  # compiles / autotunes
            if isinstance(run, common.Floor):
                row.note = f"4 GEMMs in chunks of {run.plan().chunk}"
            # Peak of one steady-state call (do_bench's own 256 MB L2-flush buffer would
            # count otherwise).
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            loss = call()
            torch.cuda.synchronize()
            row.peak_gib = torch.cuda.max_memory_allocated() / GIB
            row.extra_gib = (torch.cuda.max_memory_allocated() - base) / GIB
            row.loss = None if loss is None else float(loss)
            if inputs.student_hidden.grad is not None and not provider.startswith("floor"):
                # kept on the host: device copies would count in later providers' peaks
                grads[provider] = inputs.student_hidden.grad.detach().float().cpu()
            if shape_name == "liger" and provider in BREAKDOWN_PROVIDERS:
                try:  # a diagnostic: its failure must not cost the timing
                    BREAKDOWN.extend(peak_breakdown(f"{provider} at {shape_name}", call))
                except Exception as err:
                    BREAKDOWN.append(f"peak of {provider}: breakdown failed: {err!r}"[:200])
            row.ms = _bench_ms(call, budget_ms=min(2000.0, left_ms / 8))
        except Exception as err:  # one provider's failure must not end the benchmark
            row.status = "OOM" if harness.is_oom(err) else "error"
            row.note = (row.note + "; " if row.note else "") + f"{type(err).__name__}: {err}"[:300]
            traceback.print_exc()
        finally:
            run = call = None  # noqa: F841  (drop the provider's closures before the next)
            inputs.clear_grads()
    floor = next((r.ms for r in rows if r.provider == "floor" and r.ms), None)
    floor_big = next((r.ms for r in rows if r.provider == "floor-ws" and r.ms), None)
    ref_name = next((p for p in ("naive", "kdk-torch") if p in grads), None)
    ref_loss = next((r.loss for r in rows if r.provider == ref_name), None)
    for r in rows:
        own_floor = floor_big if r.provider.endswith("ws") else floor
        if r.ms is not None and own_floor:
            r.x_floor = r.ms / own_floor  # ws rows: against the floor chunked the same way
        if ref_loss and r.loss is not None:
            r.loss_rel_diff = abs(r.loss - ref_loss) / abs(ref_loss)
        if ref_name and r.provider in grads:
            d, ref = grads[r.provider], grads[ref_name]
            r.grad_h_rel_diff = float((d - ref).norm() / ref.norm())
    inputs = grads = None  # free before the next shape
    _free()
    return rows


# ---- output ---------------------------------------------------------------------------------

def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def write_csv(path: Path, rows: list) -> None:
    row_ops.write_rows_csv(path, rows, type(rows[0]) if rows else Row)


def summary(rows: list[Row], ops: list[RowOpRow], env: dict) -> str:
    lines = [f"kdkernels GPU bench on {env.get('device', '?')} "
             f"(torch {env.get('torch')}, triton {env.get('triton')}); "
             f"{env.get('dtype', 'bf16')}, forward KL, fwd+bwd; copy "
             f"{_fmt(env.get('copy_tb_per_s'))} TB/s",
             f"{'shape':7} {'provider':16} {'ms':>8} {'x floor':>8} {'peak GiB':>9} "
             f"{'loss diff':>9} {'dh diff':>8}  status"]
    for r in rows:
        lines.append(f"{r.shape:7} {r.provider:16} {_fmt(r.ms):>8} {_fmt(r.x_floor):>8} "
                     f"{_fmt(r.peak_gib):>9} {_fmt(r.loss_rel_diff, '.1e'):>9} "
                     f"{_fmt(r.grad_h_rel_diff, '.1e'):>8}  {r.status}"
                     + (f" ({r.note[:70]})" if r.status != "ok" else ""))
    ok_ops = [o for o in ops if o.status == "ok"]
    default_ops = [o for o in ok_ops if o.config == "default"]
    if ok_ops:
        lines.append("row kernels alone (fp32 logits, bf16 dz), the backend's default configs:")
        for o in default_ops:
            lines.append(f"  {o.what:5} {o.divergence:10} {o.rows}x{o.vocab} BLOCK_V={o.block_v} "
                         f"warps={o.num_warps} splits={o.n_split}: {_fmt(o.us, '.0f')} us, "
                         f"{_fmt(o.tb_per_s)} TB/s = {_fmt(o.of_copy, '.0%')} of copy")
        for what in ("stats", "grad"):
            best = max((o for o in ok_ops if o.what == what and o.config != "default"),
                       key=lambda o: o.tb_per_s or 0.0, default=None)
            if best is not None:
                lines.append(f"  sweep best {what}: {best.config} BLOCK_V={best.block_v} "
                             f"warps={best.num_warps} splits={best.n_split}: "
                             f"{_fmt(best.of_copy, '.0%')} of copy")
    for o in ops:
        if o.status != "ok":
            lines.append(f"  row kernels {o.divergence} {o.rows}x{o.vocab}: {o.status[:90]}")
    lines += BREAKDOWN
    lines += _targets(rows, default_ops)
    return "\n".join(lines)


def _targets(rows: list[Row], ops: list[RowOpRow]) -> list[str]:
    get = {r.provider: r for r in rows if r.shape == "liger" and r.status == "ok"}
    ours = get.get("kdk-triton")
    if ours is None:
        return ["targets: kdk-triton has no result at the liger shape"]
    peak_gb = None if ours.peak_gib is None else ours.peak_gib * GIB / 1e9
    out = [f"targets at the liger shape (kdk-triton): x floor {_fmt(ours.x_floor)} "
           f"(<= {TARGETS['floor_ratio']}), peak {_fmt(peak_gb)} GB = "
           f"{_fmt(ours.peak_gib)} GiB (<= {TARGETS['peak_gb']} GB)"]
    liger, floor = get.get("liger-chunked"), get.get("floor")
    if liger is not None and liger.ms and ours.ms:
        bound = (f"; the GEMM floor alone would be {liger.ms / floor.ms:.2f}x"
                 if floor is not None and floor.ms else "")
        out.append(f"  speed-up over LigerFusedLinearJSDLoss: {liger.ms / ours.ms:.2f}x "
                   f"(>= {TARGETS['vs_liger']}{bound})")
    # The target names the stats and gradient passes; the mix pass is reported beside them.
    for kind, kernels in (("stats/grad", ("stats", "grad")), ("mix", ("mix",))):
        picked = [o for o in ops if o.what in kernels]
        if picked:
            worst = min(picked, key=lambda o: o.of_copy or 0.0)
            out.append(f"  row kernels ({kind}): worst default config {worst.what} "
                       f"{worst.rows}x{worst.vocab} at {_fmt(worst.of_copy, '.0%')} of copy"
                       f" (>= {TARGETS['bandwidth']:.0%})")
    return out


def environment(dry_run: bool) -> dict:
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "host": platform.node(), "dry_run": dry_run,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available() and not dry_run:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / GIB, 1))
    else:
        env["device"] = "none (dry run)" if dry_run else "no CUDA device"
    return env


# ---- top-k loss -----------------------------------------------------------------------------

TOPK_CSV = ("shape", "dtype", "k", "provider", "status", "ms_median", "ratio_to_floor",
            "peak_above_inputs_mib")


def topk_shape(shape_name: str, providers: list[str], dtype: str, k: int,
               deadline: float) -> list[dict]:
    """bench/topk.py's providers (Triton backend) at one shape: do_bench median, CUDA peak
    above the inputs of one steady-state call."""
    shape = common.parse_shape(shape_name)
    _free()
    inputs = make_gpu_inputs(shape, common.DTYPES[dtype])
    dev = inputs.student_hidden.device
    ids, lps = (t.to(dev) for t in topk.make_teacher(shape.n, shape.vocab, k, 0))
    rows = []
    for provider in providers:
        row = dict(shape=shape_name, dtype=dtype, k=k,
                   provider=provider, status="ok")
        rows.append(row)
        left_ms = (deadline - time.monotonic()) * 1e3
        if left_ms < 5e3:
            row["status"] = "skipped: time budget spent"
            continue
        _free()
        base = torch.cuda.memory_allocated()
        try:
            run, _ = topk.build(provider, inputs, ids, lps, impl="triton")

            def call(run=run):
                inputs.clear_grads()
                return run()

            call()  # warm-up (Triton compiles)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            call()
            torch.cuda.synchronize()
            row["peak_above_inputs_mib"] = round(
                (torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            row["ms_median"] = _bench_ms(call, budget_ms=min(2000.0, left_ms / 8))
        except Exception as err:  # one provider's failure must not end the benchmark
            row["status"] = "OOM" if harness.is_oom(err) else f"error: {err!r}"[:200]
            traceback.print_exc()
        finally:
            run = call = None  # noqa: F841  (drop the provider's closures before the next)
            inputs.clear_grads()
    floor = next((r.get("ms_median") for r in rows if r["provider"] == "floor"), None)
    for r in rows:
        if r.get("ms_median") and floor:
            r["ratio_to_floor"] = round(r["ms_median"] / floor, 3)
    inputs = ids = lps = None  # free before the next shape
    _free()
    return rows


def run_topk(args: argparse.Namespace) -> int:
    providers = list(args.providers or topk.PROVIDERS)
    providers = ["floor"] + [p for p in providers if p != "floor"]
    dtypes = ["bf16", "fp32"] if args.dtype == "both" else [args.dtype]
    deadline = time.monotonic() + args.budget_s
    rows = []
    for name in args.shape:
        for dtype in dtypes:
            if args.dry_run:
                rows += [dict(shape=name, dtype=dtype, k=args.k, provider=p, status="dry-run")
                         for p in providers]
            else:
                rows += topk_shape(name, providers, dtype, args.k, deadline)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "gpu_topk.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=TOPK_CSV)
        wr.writeheader()
        wr.writerows({c: r.get(c) for c in TOPK_CSV} for r in rows)
    for r in rows:
        print(r)
    return 0


# ---- main -----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    """bench/loss.py --device cuda (arguments parsed and checked there)."""
    if args.dry_run:  # discovery must never start a C++/CUDA build on a CI machine
        os.environ.setdefault("KDKERNELS_NO_BUILD", "1")
    elif not torch.cuda.is_available():
        print("bench/loss.py: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    if args.loss == "topk":
        return run_topk(args)
    start = time.monotonic()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args.dry_run)
    env["dtype"] = "fp32" if args.dtype == "fp32" else "bf16"
    providers = list(args.providers or PROVIDERS)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    why = discover(torch.device("cuda"), dtype)
    rows: list[Row] = []
    ops: list[RowOpRow] = []
    if args.dry_run:
        for shape in args.shape:
            for p in providers:
                if p in LIGER_SHAPE_ONLY and shape != "liger":
                    continue
                rows.append(Row(shape, p, status="dry-run", note=why[p] or "would run"))
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        bps = row_ops.copy_bandwidth()
        env["copy_tb_per_s"] = bps / 1e12
        print(f"copy bandwidth {bps / 1e12:.2f} TB/s", flush=True)
        liger = common.SHAPES["liger"]
        run_rows = not why.get("kdk-triton")
        if run_rows:  # first: the bandwidth target must not wait behind Liger's compile
            chunk, layout = _driver_chunk(liger)
            ops += row_ops.cuda_row_ops(bps, deadline, liger.vocab, chunk, sweep=False,
                                        layout=layout)
            ops += row_ops.cuda_row_ops(bps, deadline, liger.vocab, 4096, sweep=False,
                                        layout=layout)
            write_csv(args.out / "gpu_rowops.csv", ops)
        for i, shape in enumerate(args.shape):
            shape_providers = [p for p in providers
                               if p not in LIGER_SHAPE_ONLY or shape == "liger"]
            print(f"== {shape} {common.parse_shape(shape)}", flush=True)
            rows += bench_shape(shape, shape_providers, why, deadline, dtype)
            write_csv(args.out / "gpu_bench.csv", rows)
            if i == 0 and run_rows and not args.no_sweep:
                ops += row_ops.cuda_row_ops(bps, deadline, liger.vocab, chunk, sweep=True,
                                            default=False, layout=layout)
                write_csv(args.out / "gpu_rowops.csv", ops)
    env["seconds"] = round(time.monotonic() - start, 1)
    env["providers"] = {p: (why[p] or "ok") for p in providers}
    write_csv(args.out / "gpu_bench.csv", rows)
    write_csv(args.out / "gpu_rowops.csv",
              ops or [RowOpRow("none", "-", 0, 0, "-", "-", "-", "-", "-",
                               status="dry-run" if args.dry_run else "not run")])
    (args.out / "gpu_env.json").write_text(json.dumps(env, indent=1, default=str))
    text = summary(rows, ops, env)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    return 0


def _driver_chunk(shape: common.Shape) -> tuple[int, str]:
    """(rows per chunk, dL/dz layout) the driver picks for kdk-triton at this shape (default
    workspace)."""
    inputs = make_gpu_inputs(shape, torch.bfloat16)
    plan = common.floor_plan(inputs, impl="triton")
    return plan.chunk, plan.dz_layout
