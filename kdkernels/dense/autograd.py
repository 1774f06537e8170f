"""Autograd Functions of the dense-teacher losses, on the shared plumbing of
engine/autograd.py (gradients computed in forward, scaled by grad_output in backward)."""

from __future__ import annotations

import torch

from ..engine.autograd import (
    FusedOutcome,
    LogitsOutcome,
    acc_dtype,
    combine,
    fused_backward,
    normaliser,
    reduce_rows,
    run_fused,
    save_fused,
    save_logits,
    scale_grad,
)
from ..engine.driver import ChunkRun, RowResult
from ..engine.validation import scan_labels
from .plan import Plan
from .rows import fused_rows, logits_rows


def fused_forward(h, w, bs, g, u, bt, labels, plan: Plan, want_h: bool, want_w: bool,
                  want_b: bool) -> FusedOutcome:
    """The fused loss on flat inputs h [N, Ds], g [N, Dt], labels [N] (plain tensors)."""
    opts = plan.opts
    vocab = min(w.shape[0], u.shape[0])
    rows_kept = scan_labels(labels, h.shape[0], plan.label_vocab, opts.ignore_index)
    run = ChunkRun(rows_kept.idx, rows_kept.kept, want_h, want_w, want_b, acc_dtype(h))

    def rows(run: ChunkRun) -> RowResult:
        # Heads cut to the shared vocabulary (views), cast only where the GEMMs need it; the
        # casts are made per pass, so that none outlives it (a recompute keeps ``rows``).
        return fused_rows(plan, run, h, w[:vocab].to(plan.compute_dtype_s),
                          None if bs is None else bs[:vocab], g,
                          u[:vocab].to(plan.compute_dtype_t),
                          None if bt is None else bt[:vocab], labels)

    return run_fused(rows, run, h, w, bs, vocab, opts, plan.spec.has_ce)


class FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, bs, g, u, bt, labels, plan: Plan):
        out = fused_forward(h, w, bs, g, u, bt, labels, plan, *ctx.needs_input_grad[:3])
        return save_fused(ctx, out, h.device)

    @staticmethod
    def backward(ctx, go, _gkd, _gce, _gn, _gent):
        return (*fused_backward(ctx, go), None, None, None, None, None)


def logits_forward(zs, zt, labels, plan: Plan, want_grad: bool) -> LogitsOutcome:
    """The logits loss on flat inputs zs [N, Vs], zt [N, Vt], labels [N] (plain tensors).
    With reduction='none' the gradient is per row for unit weights, so backward can scale
    it row by row without a recompute."""
    opts = plan.opts
    n = zs.shape[0]
    rows_kept = scan_labels(labels, n, plan.label_vocab, opts.ignore_index)
    keep, kept = rows_kept.mask, rows_kept.kept
    norm = normaliser(opts, kept)
    unit = 1.0 if opts.reduction == "none" else 1.0 / norm
    row_scale = None
    if want_grad:
        acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
        row_scale = torch.full((n,), unit, dtype=acc, device=zs.device)
        if keep is not None:
            row_scale = torch.where(keep, row_scale, torch.zeros_like(row_scale))
    kd, ce, entropy, grad = logits_rows(plan, zs, zt, labels, row_scale)
    if keep is not None:
        kd = torch.where(keep, kd, torch.zeros_like(kd))
        entropy = torch.where(keep, entropy, torch.zeros_like(entropy))
        ce = None if ce is None else torch.where(keep, ce, torch.zeros_like(ce))
    loss = reduce_rows(combine(opts, kd, ce), opts, norm)
    kd_red = reduce_rows(kd, opts, norm)
    ce_red = torch.full_like(kd_red, float("nan")) if ce is None else reduce_rows(ce, opts, norm)
    return LogitsOutcome(loss, kd_red, ce_red, kept, grad, reduce_rows(entropy, opts, norm))


class LogitsKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, labels, plan: Plan):
        return save_logits(ctx, logits_forward(zs, zt, labels, plan, ctx.needs_input_grad[0]),
                           zs.device)

    @staticmethod
    def backward(ctx, go, _gkd, _gce, _gn, _gent):
        return scale_grad(ctx.saved_tensors[0], go), None, None, None
