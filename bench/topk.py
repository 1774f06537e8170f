"""Building blocks of the sparse-teacher (top-k) loss benchmark (bench/loss.py --loss topk,
CPU and CUDA): the teacher's K ids and log-probs per token, and the providers.

    floor        the three student GEMMs of the fused top-k loss (logits, grad_hidden,
                 grad_weight), chunked exactly as the loss chunks them (the same planner)
    topk_zero    kdkernels.fused_linear_topk_kd_loss, tail="zero" (the peers' math)
    topk_bucket  the same with tail="bucket" (the default)
    topk_bucket_jsd  tail="bucket", divergence="jsd": the generic rule of the non-KL
                 divergences (tails.py), which differs from topk_bucket only in [C, K] math
    naive_topk   the peers' way (axolotl, DistillKit): materialised [N, V] student logits,
                 log_softmax, gather at the teacher's ids, sum q (log q - log p) (= tail "zero")
    dense_fused  kdkernels.fused_linear_kd_loss against a dense teacher of Dt hidden size

All but topk_bucket_jsd use forward KL at T = 1 with K teacher ids per token; topk_zero and
naive_topk compute the same loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bench import common

PROVIDERS = ("floor", "topk_zero", "topk_bucket", "naive_topk", "dense_fused")
EXTRA = ("topk_bucket_jsd",)  # not in the default run; --providers names it
AGREE = ("topk_zero", "naive_topk")  # providers whose losses must match


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


def _floor(inputs: common.Inputs, impl: str) -> tuple[Callable[[], None], str]:
    from kdkernels.backends import registry
    from kdkernels.backends.base import RowSpec
    from kdkernels.engine import gemm
    from kdkernels.engine.chunking import plan_chunks
    from kdkernels.options import DEFAULT_MAX_WORKSPACE_BYTES

    h, w = inputs.student_hidden, inputs.student_weight
    dev = h.device
    cd = gemm.compute_dtype(h.dtype, dev)
    zs_dtype = gemm.logits_dtype(cd, dev)
    backend = registry.select(impl, dev, zs_dtype, RowSpec.build("forward_kl"),
                              student_only=True)
    plan = plan_chunks(n_rows=h.shape[0], width=w.shape[0], backend=backend,
                       logits_dtype=zs_dtype, grad_dtype=cd, device=dev,
                       budget=DEFAULT_MAX_WORKSPACE_BYTES, student_only=True)

    def run() -> None:
        wc = w.detach().to(cd)
        hd = h.detach().to(cd)
        zs = torch.empty(plan.rows, w.shape[0], dtype=zs_dtype, device=dev)
        dz = zs if plan.dz_layout == "in_place" else torch.empty(plan.rows, w.shape[0],
                                                                 dtype=cd, device=dev)
        gh = torch.empty_like(hd)
        gw = torch.zeros(w.shape, dtype=torch.float32, device=dev)
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


def build(name: str, inputs: common.Inputs, ids: torch.Tensor, lps: torch.Tensor,
          impl: str = "auto") -> tuple[Callable[[], torch.Tensor | None], str]:
    """(run() -> loss or None doing forward + backward, a note for the table)."""
    import kdkernels

    h, w = inputs.student_hidden, inputs.student_weight
    if name == "floor":
        return _floor(inputs, impl)
    if name in ("topk_zero", "topk_bucket", "topk_bucket_jsd"):
        tail = name.split("_")[1]
        divergence = "jsd" if name.endswith("_jsd") else "forward_kl"

        def run_topk() -> torch.Tensor:
            loss = kdkernels.fused_linear_topk_kd_loss(h, w, ids, lps, tail=tail,
                                                       divergence=divergence, impl=impl)
            loss.backward()
            return loss.detach()
        return run_topk, ""
    if name == "naive_topk":
        def run_naive() -> torch.Tensor:
            logp = torch.log_softmax((h @ w.t()).float(), -1)
            lp_s = logp.gather(1, ids)
            loss = (lps.exp() * (lps - lp_s)).sum() / h.shape[0]
            loss.backward()
            return loss.detach()
        return run_naive, ""
    if name == "dense_fused":
        g, u = inputs.teacher_hidden, inputs.teacher_weight

        def run_dense() -> torch.Tensor:
            loss = kdkernels.fused_linear_kd_loss(h, w, g, u, impl=impl)
            loss.backward()
            return loss.detach()
        return run_dense, f"teacher Dt {g.shape[1]}"
    raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS + EXTRA)}")
