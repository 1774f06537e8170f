"""One rank of a spawned gloo world for tests/test_vocab_parallel.py.

Run as ``python -m tests._tp_worker RANK WORLD PORT OUT``. It runs every case of CASES twice
on vocab shards and every bad-input case of BAD once, then saves what it saw to OUT (one
file per rank); the test compares the files with the float64 oracle. Inputs are made from a
seed, so the test process rebuilds the full (unsharded) tensors without communication.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import torch

from tests._dist import exit_worker

N, DS, DT, V = 37, 16, 24, 1009
IGNORED_ROWS = (5, 11, 30)
IGNORE = -100

# Every case: loss options plus harness keys (kind, bias, layout, go, ...). Chunk sizes 7, 5,
# 6 do not divide N = 37; V = 1009 splits unevenly over 2, 3 and 4 ranks.
# The row-op backend is pinned per case (impl="torch" unless named): the reducer is backend
# independent, and the test process passes the other CPU backends it found in KDK_TP_IMPLS.
_LABELLED = dict(temperature=2.0, ce_weight=0.5, chunk_size=7, labels=True)
CASES: dict[str, dict[str, Any]] = {
    "forward_kl": dict(divergence="forward_kl", **_LABELLED),
    "reverse_kl": dict(divergence="reverse_kl", **_LABELLED),
    "jsd": dict(divergence="jsd", beta=0.3, **_LABELLED),
    "skew_forward_kl": dict(divergence="skew_forward_kl", skew=0.2, **_LABELLED),
    "skew_reverse_kl": dict(divergence="skew_reverse_kl", skew=0.2, **_LABELLED),
    "tvd": dict(divergence="tvd", **_LABELLED),
    "alpha": dict(divergence="alpha", alpha=0.3, **_LABELLED),
    "bias_auto_chunk": dict(divergence="forward_kl", bias=True),
    "softcap_sum_small_workspace": dict(divergence="jsd", student_softcap=3.0,
                                        teacher_softcap=4.0, reduction="sum", labels=True,
                                        ce_weight=0.2, max_workspace_bytes=20_000),
    # logit scales multiply each rank's raw logits before the caps: merged like any others
    "logit_scales": dict(divergence="jsd", beta=0.3, student_logit_scale=0.5,
                         teacher_logit_scale=3.0, student_softcap=6.0, **_LABELLED),
    # the per-token signals of RL trainers, exact across shards
    "signals_none": dict(divergence="reverse_kl", reduction="none", labels=True,
                         return_components=True, temperature=1.5, student_logit_scale=2.0,
                         chunk_size=5, go=True),
    "kd_loss_signals": dict(kind="logits", divergence="forward_kl", temperature=2.0,
                            labels=True, return_components=True, chunk_size=6),
    "reduction_none": dict(divergence="reverse_kl", reduction="none", labels=True,
                           ce_weight=1.0, chunk_size=5, go=True),
    "explicit_reversed_layout": dict(divergence="forward_kl", layout="reversed", **_LABELLED),
    "kd_loss_logits": dict(kind="logits", divergence="tvd", temperature=1.5, ce_weight=0.3,
                           chunk_size=6, labels=True),
    "module_components": dict(kind="module", divergence="skew_reverse_kl", temperature=0.7,
                              ce_weight=0.4, labels=True, chunk_size=9,
                              return_components=True),
    "dtensor_heads": dict(kind="dtensor", divergence="jsd", temperature=1.3, labels=True,
                          ce_weight=0.5, chunk_size=8, bias=True),
    "group_of_one": dict(kind="single", divergence="reverse_kl", temperature=2.0,
                         ce_weight=0.5, labels=True, chunk_size=10),
    # bf16 heads and hidden states: bf16 gradients, grad_hidden summed across ranks in fp32
    "bf16": dict(divergence="jsd", beta=0.4, temperature=1.5, ce_weight=0.3, labels=True,
                 chunk_size=13, bias=True, dtype="bf16"),
}
for _case in CASES.values():
    _case.setdefault("impl", "torch")
for _impl in filter(None, os.environ.get("KDK_TP_IMPLS", "").split(",")):
    if _impl != "torch":
        CASES[f"backend_{_impl}"] = dict(divergence="jsd", impl=_impl, **_LABELLED)
        CASES[f"backend_{_impl}_fkl_bias"] = dict(divergence="forward_kl", bias=True,
                                                 impl=_impl, chunk_size=11)
_HARNESS = ("kind", "bias", "layout", "go", "labels", "dtype")
SIGNALS = ("kd", "ce", "student_entropy", "label_logprob")  # of return_components

# Bad inputs: name -> (what to break, substring every rank's error must contain).
BAD: dict[str, str] = {
    "overlap": "overlaps",
    "gap": "leaves a gap",
    "student_teacher_rows": "student and teacher shards must cover the same",
    "mixed_vocab_start": "vocab_start must be given on every rank or on none",
    "chunk_mismatch_first_use": "differ across ranks",
    "option_mismatch_after_first_use": "differ across ranks",
    "logit_scale_mismatch": "differ across ranks",
    # an input that only one rank rejects: every rank raises (none waits in a collective)
    "head_dim_one_rank_after_first_use": "rejected their inputs",
    "bias_length_one_rank": "rejected their inputs",
    "empty_shard": "must hold at least one vocabulary row",
    "label_out_of_range": "labels must be in [0, 1009)",
}

# ... and the rank that rejected them (the last) says why, naming the argument.
BAD_ON_LAST_RANK: dict[str, str] = {"head_dim_one_rank_after_first_use": "student_weight",
                                    "bias_length_one_rank": "student_bias"}


def widths(vocab: int, parts: int) -> list[int]:
    base, extra = divmod(vocab, parts)
    return [base + (r < extra) for r in range(parts)]


def shard(vocab: int, parts: int, rank: int, layout: str = "rank") -> tuple[int, int]:
    """(start, stop) of a rank's rows; 'reversed' puts rank 0 on the last block."""
    w = widths(vocab, parts)
    block = rank if layout == "rank" else parts - 1 - rank
    start = sum(w[:block])
    return start, start + w[block]


def dtensor_shard(vocab: int, parts: int, rank: int) -> tuple[int, int]:
    per = -(-vocab // parts)  # DTensor Shard(0) follows torch.chunk
    return min(rank * per, vocab), min((rank + 1) * per, vocab)


def make_inputs(case: dict, parts: int) -> dict[str, torch.Tensor | None]:
    """Full fp32 (or bf16) inputs; labels hit every rank's shard (under every layout)."""
    gen = torch.Generator().manual_seed(1234)
    h = torch.randn(N, DS, generator=gen)
    g = torch.randn(N, DT, generator=gen)
    w = torch.randn(V, DS, generator=gen) * 0.5
    u = torch.randn(V, DT, generator=gen) * 0.4
    bs = torch.randn(V, generator=gen) if case.get("bias") else None
    bt = torch.randn(V, generator=gen) if case.get("bias") else None
    labels = None
    if case.get("labels"):
        labels = torch.randint(0, V, (N,), generator=gen)
        for r in range(parts):
            for lo, hi in (shard(V, parts, r), dtensor_shard(V, parts, r)):
                labels[2 * r + (lo % 2) + 12] = (lo + hi) // 2
        labels[list(IGNORED_ROWS)] = IGNORE
    go = torch.rand(N, generator=gen) + 0.5 if case.get("go") else None
    if case.get("dtype") == "bf16":
        h, g, w, u, bs, bt = (None if t is None else t.bfloat16() for t in (h, g, w, u, bs, bt))
    return dict(h=h, g=g, w=w, u=u, bs=bs, bt=bt, labels=labels, go=go)


def options(case: dict) -> dict[str, Any]:
    return {k: v for k, v in case.items() if k not in _HARNESS}


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone().requires_grad_(True)


def _grad(t: Any) -> torch.Tensor | None:
    if t is None or t.grad is None:
        return None
    grad = t.grad
    return grad.to_local() if hasattr(grad, "to_local") else grad


def record_plans(log: list) -> None:
    """Log (width, kept rows, rows per chunk, dz layout) of every chunk plan the driver makes."""
    from kdkernels.engine import driver

    real = driver.plan_chunks

    def spy(**kw):
        plan = real(**kw)
        log.append((kw["width"], kw["n_rows"], plan.rows, plan.dz_layout))
        return plan

    driver.plan_chunks = spy


def run_case(case: dict, rank: int, parts: int, singles: list) -> dict[str, Any]:
    import kdkernels
    from kdkernels.parallel import VocabParallel

    x = make_inputs(case, parts)
    kind, opts = case.get("kind", "fused"), options(case)
    layout = case.get("layout", "rank")
    lo, hi = shard(V, parts, rank, layout)
    vp = VocabParallel(vocab_start=lo if layout != "rank" else None)
    if kind == "single":
        lo, hi, vp = 0, V, VocabParallel(group=singles[rank])
    h, g = _leaf(x["h"]), x["g"]
    if kind == "logits":
        zs = _leaf((x["h"] @ x["w"].t())[:, lo:hi])
        zt = (x["g"] @ x["u"].t())[:, lo:hi].contiguous()
        loss = kdkernels.kd_loss(zs, zt, x["labels"], vocab_parallel=vp, **opts)
        comps = {}
        if opts.get("return_components"):
            comps, loss = {k: getattr(loss, k) for k in SIGNALS}, loss.loss
        loss.backward()
        return {"loss": loss.detach(), "grad_zs": _grad(zs), **comps}
    w, u = _leaf(x["w"][lo:hi]), x["u"][lo:hi].contiguous()
    bs = _leaf(None if x["bs"] is None else x["bs"][lo:hi])
    bt = None if x["bt"] is None else x["bt"][lo:hi].contiguous()
    if kind == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (parts,))
        place = [Shard(0)]
        w = distribute_tensor(x["w"], mesh, place, src_data_rank=None).requires_grad_(True)
        u = distribute_tensor(x["u"], mesh, place, src_data_rank=None)
        bs = distribute_tensor(x["bs"], mesh, place, src_data_rank=None).requires_grad_(True)
        bt = distribute_tensor(x["bt"], mesh, place, src_data_rank=None)
        vp = None
    out: dict[str, Any] = {}
    if kind == "module":
        mod = kdkernels.FusedLinearKDLoss(vocab_parallel=vp, **opts)
        res = mod(h, w, g, u, x["labels"], student_bias=bs, teacher_bias=bt)
        loss = res.loss
        out.update({k: getattr(res, k) for k in SIGNALS})
    else:
        loss = kdkernels.fused_linear_kd_loss(h, w, g, u, x["labels"], student_bias=bs,
                                              teacher_bias=bt, vocab_parallel=vp, **opts)
        if opts.get("return_components"):
            out.update({k: getattr(loss, k) for k in SIGNALS})
            loss = loss.loss
    (loss * x["go"]).sum().backward() if x["go"] is not None else loss.backward()
    out.update(loss=loss.detach(), grad_h=_grad(h), grad_w=_grad(w), grad_bs=_grad(bs))
    return out


def run_bad(name: str, rank: int, parts: int) -> str:
    """Break one input on some ranks; return the error message (or 'no error')."""
    import kdkernels
    from kdkernels.parallel import VocabParallel

    x = make_inputs(dict(labels=True), parts)
    lo, hi = shard(V, parts, rank)
    w, u = x["w"][lo:hi], x["u"][lo:hi]
    opts: dict[str, Any] = dict(chunk_size=7, temperature=2.0, impl="torch")
    vp = VocabParallel()
    labels = x["labels"]
    if name == "overlap":
        vp = VocabParallel(vocab_start=max(0, lo - 1))
    elif name == "gap":
        last = rank == parts - 1
        vp = VocabParallel(vocab_start=lo + last)
        w, u = w[: hi - lo - last], u[: hi - lo - last]
    elif name == "student_teacher_rows":
        if rank == parts - 1:
            u = x["u"][lo - 1:hi]
    elif name == "mixed_vocab_start":
        vp = VocabParallel(vocab_start=lo if rank == 0 else None)
    elif name == "chunk_mismatch_first_use":
        opts["chunk_size"] = 7 + (rank == 0)
    elif name == "option_mismatch_after_first_use":
        kdkernels.fused_linear_kd_loss(x["h"], w, x["g"], u, labels, vocab_parallel=vp, **opts)
        opts["temperature"] = 2.0 + (rank == 0)
    elif name == "logit_scale_mismatch":  # part of the settings checksum
        opts["student_logit_scale"] = 1.0 + (rank == 0)
    elif name == "head_dim_one_rank_after_first_use":
        kdkernels.fused_linear_kd_loss(x["h"], w, x["g"], u, labels, vocab_parallel=vp, **opts)
        if rank == parts - 1:
            w = w[:, :-1]
    elif name == "bias_length_one_rank":
        bias = torch.zeros(w.shape[0] + (rank == parts - 1))
        try:
            kdkernels.fused_linear_kd_loss(x["h"], w, x["g"], u, labels, student_bias=bias,
                                           vocab_parallel=vp, **opts)
        except (ValueError, RuntimeError, TypeError) as err:
            return f"{type(err).__name__}: {err}"
        return "no error"
    elif name == "empty_shard":
        if rank == parts - 1:
            w, u = w[:0], u[:0]
    elif name == "label_out_of_range":
        labels = labels.clone()
        labels[3] = V
    try:
        kdkernels.fused_linear_kd_loss(x["h"], w, x["g"], u, labels, vocab_parallel=vp, **opts)
    except (ValueError, RuntimeError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def main(rank: int, parts: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # several ranks share two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=parts)
    singles = [dist.new_group([r]) for r in range(parts)]  # every rank makes every group
    results: dict[str, Any] = {"cases": {}, "bad": {}, "plans": {}}
    plans: list = []
    record_plans(plans)
    try:
        for name, case in CASES.items():
            plans.clear()
            results["cases"][name] = [run_case(case, rank, parts, singles) for _ in range(2)]
            results["plans"][name] = list(plans)
        for name in BAD:
            results["bad"][name] = run_bad(name, rank, parts)
    except Exception:
        results["crash"] = traceback.format_exc()
    torch.save(results, out_path)
    exit_worker()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
