"""Autograd Functions of the sparse-teacher losses: as the dense ones (engine/autograd.py), the
gradient is computed during forward and backward scales it by grad_output; with
reduction='none' the fused loss recomputes its chunks with grad_output as row weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.base import Backend, RowSpec
from ..engine.autograd import (
    FusedOutcome,
    LogitsOutcome,
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
from ..engine.chunking import ChunkPlan, plan_chunks
from ..engine.driver import RowSource, student_chunks
from ..engine.gemm import logits_dtype
from ..engine.local_reducer import Reducer
from ..engine.validation import scan_labels
from .options import TopKOptions
from .rows import SparseChunks, logits_rows
from .teacher import prepare_teacher


@dataclass(frozen=True)
class SparsePlan:
    """Everything the Functions need besides tensors."""

    opts: TopKOptions
    spec: RowSpec
    backend: Backend
    reducer: Reducer
    compute_dtype: torch.dtype
    vocab: int  # teacher ids and labels must be in [0, vocab) (the global vocabulary)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kept(labels, ids, logprobs, n: int, plan: SparsePlan):
    opts = plan.opts
    error = teacher = None
    try:
        rows_kept = scan_labels(labels, n, plan.vocab, opts.ignore_index)
        teacher = prepare_teacher(ids, logprobs, rows_kept.idx, plan.vocab, opts.temperature)
    except ValueError as err:  # vocab-parallel: every rank raises, none waits in a chunk
        error = err
    plan.reducer.raise_together(error)
    lab = None
    if labels is not None:
        lab = labels if rows_kept.idx is None else labels.index_select(0, rows_kept.idx)
    return rows_kept, teacher, lab


def _plan(plan: SparsePlan, n_rows: int, vocab: int, logits: torch.dtype, grad, device,
          bytes_per_row: int = 0) -> ChunkPlan:
    opts = plan.opts.dense
    return plan_chunks(n_rows=n_rows, width=plan.reducer.chunk_width(vocab),
                       backend=plan.backend, logits_dtype=logits, grad_dtype=grad,
                       device=device, budget=opts.workspace_budget, chunk_size=opts.chunk_size,
                       bytes_per_row=bytes_per_row, student_only=True)


def topk_fused_forward(h, w, bs, ids, logprobs, labels, plan: SparsePlan, want_h: bool,
                       want_w: bool, want_b: bool) -> FusedOutcome:
    """The fused top-k loss on flat h [N, Ds], ids / logprobs [N, K], labels [N]."""
    rows_kept, teacher, lab = _kept(labels, ids, logprobs, h.shape[0], plan)
    idx, kept = rows_kept.idx, rows_kept.kept
    cd = plan.compute_dtype

    def rows(row_scale):
        need_grad = row_scale is not None and (want_h or want_w or want_b)
        per_row = 0
        if RowSource.staged(idx, h.dtype, cd):
            per_row += h.shape[1] * cd.itemsize
        if need_grad and want_h and idx is not None:
            per_row += h.shape[1] * cd.itemsize
        chunks = _plan(plan, kept, w.shape[0], logits_dtype(cd, h.device),
                       cd if need_grad else None, h.device, per_row)
        chunk_rows = SparseChunks(teacher, lab, plan.opts, plan.spec, plan.backend,
                                  plan.reducer)
        return student_chunks(h, w.to(cd), bs, chunk_rows, idx=idx, n_kept=kept,
                              chunks=chunks, cd_s=cd, row_scale=row_scale, want_h=want_h,
                              want_w=want_w, want_b=want_b, reducer=plan.reducer,
                              acc_dtype=_acc(h), has_ce=plan.spec.has_ce)

    return run_fused(rows, h, w, bs, rows_kept, w.shape[0], plan.opts.dense, plan.spec.has_ce,
                     want_h, want_w, want_b)


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
        row_scale = torch.full((kept,), unit, dtype=_acc(zs), device=zs.device)
    chunk = _plan(plan, kept, zs.shape[1], zs.dtype, None, zs.device).rows
    rows = SparseChunks(teacher, lab, plan.opts, plan.spec, plan.backend, plan.reducer)
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
