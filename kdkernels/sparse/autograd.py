"""Autograd Functions of the sparse-teacher losses: as the dense ones (engine/autograd.py), the
gradient is computed during forward and backward scales it by grad_output; with
reduction='none' the fused loss recomputes its chunks with grad_output as row weights."""

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
    scatter_rows,
)
from ..engine.driver import ChunkRun, RowResult, plan_fused, plan_logits, student_chunks
from ..engine.validation import scan_labels
from .plan import SparsePlan
from .rows import SparseChunks, logits_rows
from .teacher import prepare_teacher


def _kept(labels, ids, logprobs, n: int, plan: SparsePlan):
    opts = plan.opts
    error = teacher = None
    try:
        rows_kept = scan_labels(labels, n, plan.vocab, opts.ignore_index)
        teacher = prepare_teacher(ids, logprobs, rows_kept.idx, plan.vocab, plan.spec)
    except ValueError as err:  # vocab-parallel: every rank raises, none waits in a chunk
        error = err
    plan.reducer.raise_together(error)
    lab = None
    if labels is not None:
        lab = labels if rows_kept.idx is None else labels.index_select(0, rows_kept.idx)
    return rows_kept, teacher, lab


def topk_fused_forward(h, w, bs, ids, logprobs, labels, plan: SparsePlan, want_h: bool,
                       want_w: bool, want_b: bool) -> FusedOutcome:
    """The fused top-k loss on flat h [N, Ds], ids / logprobs [N, K], labels [N]."""
    rows_kept, teacher, lab = _kept(labels, ids, logprobs, h.shape[0], plan)
    run = ChunkRun(rows_kept.idx, rows_kept.kept, want_h, want_w, want_b, acc_dtype(h))

    def rows(run: ChunkRun) -> RowResult:
        chunks = plan_fused(plan, run, h, w.shape[0])
        chunk_rows = SparseChunks(plan, teacher, lab)
        return student_chunks(plan, run, chunks, h, w.to(plan.compute_dtype_s), bs,
                              chunk_rows)

    return run_fused(rows, run, h, w, bs, w.shape[0], plan.opts.dense, plan.spec.has_ce)


def topk_logits_forward(zs, ids, logprobs, labels, plan: SparsePlan,
                        want_grad: bool) -> LogitsOutcome:
    """The top-k loss on materialised student logits zs [N, V]."""
    opts = plan.opts.dense
    n = zs.shape[0]
    rows_kept, teacher, lab = _kept(labels, ids, logprobs, n, plan)
    idx, kept = rows_kept.idx, rows_kept.kept
    norm = normaliser(opts, kept)
    row_scale = None
    if want_grad:
        unit = 1.0 if opts.reduction == "none" else 1.0 / norm
        row_scale = torch.full((kept,), unit, dtype=acc_dtype(zs), device=zs.device)
    chunk = plan_logits(plan, zs, kept, zs.shape[1], student_only=True)
    rows = SparseChunks(plan, teacher, lab)
    kd, ce, entropy, grad = logits_rows(zs, idx, chunk, rows, row_scale)
    if grad is None and want_grad:
        grad = torch.zeros_like(zs)

    def reduce(x):
        return reduce_rows(scatter_rows(x, idx, n) if opts.reduction == "none" else x, opts, norm)

    loss, kd_red = reduce(combine(opts, kd, ce)), reduce(kd)
    ce_red = torch.full_like(kd_red, float("nan")) if ce is None else reduce(ce)
    return LogitsOutcome(loss, kd_red, ce_red, kept, grad, reduce(entropy))


class TopKFusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, bs, ids, logprobs, labels, plan: SparsePlan):
        out = topk_fused_forward(h, w, bs, ids, logprobs, labels, plan,
                                 *ctx.needs_input_grad[:3])
        return save_fused(ctx, out, h.device)

    @staticmethod
    def backward(ctx, go, _gkd, _gce, _gn, _gent):
        return (*fused_backward(ctx, go), None, None, None, None)


class TopKLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, ids, logprobs, labels, plan: SparsePlan):
        return save_logits(ctx, topk_logits_forward(zs, ids, logprobs, labels, plan,
                                                    ctx.needs_input_grad[0]), zs.device)

    @staticmethod
    def backward(ctx, go, _gkd, _gce, _gn, _gent):
        return scale_grad(ctx.saved_tensors[0], go), None, None, None, None
