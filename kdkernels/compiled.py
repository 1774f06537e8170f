"""torch.compile support: each loss as one opaque custom op.

Dynamo cannot trace the chunk driver (data-dependent row counts, host-side checks), so
under torch.compile the public functions route here: the ops run the same eager code
(autograd.fused_forward, autograd.logits_forward) and register a fake impl for tracing and an
autograd formula that scales the gradients computed during forward (the fused loss
recomputes them for reduction='none').
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .autograd import Plan, fused_forward, logits_forward, row_spec
from .backends import registry
from .gemm import logits_dtype
from .options import KDOptions
from .reducer import LOCAL
from .validation import check_label_range

_NAMESPACE = "kdkernels"


def _plan(h: Tensor, labels: Optional[Tensor], opts: KDOptions, cd_s, cd_t,
          rows_dtype: Optional[torch.dtype] = None) -> Plan:
    """rows_dtype: the dtype the row kernels see (the logits' for kd_loss; by default the
    fused loss's chunk-logits dtype)."""
    spec = row_spec(opts, labels)
    ld = logits_dtype(cd_s, h.device) if rows_dtype is None else rows_dtype
    backend = registry.select(opts.impl, h.device, ld, spec)
    return Plan(opts, spec, backend, LOCAL, cd_s, cd_t)


def _options(divergence, beta, skew, temperature, scale_by_t2, kd_weight, ce_weight,
             student_softcap, teacher_softcap, ignore_index, reduction, num_items, chunk_size,
             max_workspace_bytes, impl, return_components) -> KDOptions:
    return KDOptions(divergence, beta, skew, temperature, scale_by_t2, kd_weight, ce_weight,
                     student_softcap, teacher_softcap, ignore_index, reduction, num_items,
                     chunk_size, max_workspace_bytes, impl, return_components)


@torch.library.custom_op(f"{_NAMESPACE}::fused_linear_kd", mutates_args=())
def fused_linear_kd_op(
    h: Tensor, w: Tensor, bs: Optional[Tensor], g: Tensor, u: Tensor, bt: Optional[Tensor],
    labels: Optional[Tensor], want: list[bool], cd_s: torch.dtype, cd_t: torch.dtype,
    divergence: str, beta: float, skew: float, temperature: float, scale_by_t2: bool,
    kd_weight: float, ce_weight: float, student_softcap: Optional[float],
    teacher_softcap: Optional[float], ignore_index: int, reduction: str,
    num_items: Optional[float], chunk_size: Optional[int], max_workspace_bytes: Optional[int],
    impl: str, return_components: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, kd, ce, n_tokens, grad_h, grad_w, grad_b); a gradient not computed in forward
    (not wanted, or reduction='none') is an empty tensor."""
    opts = _options(divergence, beta, skew, temperature, scale_by_t2, kd_weight, ce_weight,
                    student_softcap, teacher_softcap, ignore_index, reduction, num_items,
                    chunk_size, max_workspace_bytes, impl, return_components)
    check_label_range(labels, min(w.shape[0], u.shape[0]), ignore_index)
    out = fused_forward(h, w, bs, g, u, bt, labels, _plan(h, labels, opts, cd_s, cd_t), *want)
    grads = out.grads or (None, None, None)
    # Outputs may not alias each other: a fresh empty tensor per missing gradient.
    return (out.loss, out.kd, out.ce, torch.tensor(out.kept, device=h.device),
            *(h.new_empty(0) if t is None else t for t in grads))


@fused_linear_kd_op.register_fake
def _fake(h, w, bs, g, u, bt, labels, want, cd_s, cd_t, divergence, beta, skew, temperature,
          scale_by_t2, kd_weight, ce_weight, student_softcap, teacher_softcap, ignore_index,
          reduction, num_items, chunk_size, max_workspace_bytes, impl, return_components):
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    shape = (h.shape[0],) if reduction == "none" else ()
    eager = reduction != "none"
    return (h.new_empty(shape, dtype=acc), h.new_empty(shape, dtype=acc),
            h.new_empty(shape, dtype=acc), h.new_empty((), dtype=torch.int64),
            torch.empty_like(h) if eager and want[0] else h.new_empty(0),
            torch.empty_like(w) if eager and want[1] else h.new_empty(0),
            torch.empty_like(bs) if eager and want[2] and bs is not None else h.new_empty(0))


@torch.library.custom_op(f"{_NAMESPACE}::fused_linear_kd_backward", mutates_args=())
def fused_linear_kd_backward_op(
    h: Tensor, w: Tensor, bs: Optional[Tensor], g: Tensor, u: Tensor, bt: Optional[Tensor],
    labels: Optional[Tensor], want: list[bool], cd_s: torch.dtype, cd_t: torch.dtype,
    grad_rows: Tensor, divergence: str, beta: float, skew: float, temperature: float,
    scale_by_t2: bool, kd_weight: float, ce_weight: float, student_softcap: Optional[float],
    teacher_softcap: Optional[float], ignore_index: int, num_items: Optional[float],
    chunk_size: Optional[int], max_workspace_bytes: Optional[int], impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of reduction='none' for per-row grad_output ``grad_rows`` (recomputed)."""
    opts = _options(divergence, beta, skew, temperature, scale_by_t2, kd_weight, ce_weight,
                    student_softcap, teacher_softcap, ignore_index, "none", num_items,
                    chunk_size, max_workspace_bytes, impl, False)
    out = fused_forward(h, w, bs, g, u, bt, labels, _plan(h, labels, opts, cd_s, cd_t), *want)
    return tuple(h.new_empty(0) if t is None else t for t in out.recompute(grad_rows))


@fused_linear_kd_backward_op.register_fake
def _fake_backward(h, w, bs, g, u, bt, labels, want, cd_s, cd_t, grad_rows, *args):
    return (torch.empty_like(h) if want[0] else h.new_empty(0),
            torch.empty_like(w) if want[1] else h.new_empty(0),
            torch.empty_like(bs) if want[2] and bs is not None else h.new_empty(0))


_FWD_OPTION_SLICE = slice(10, 26)  # divergence .. return_components in the forward schema


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs
    ctx.mark_non_differentiable(*output[1:])  # kd, ce, n_tokens, the grads: as eager
    # Saved, not kept on ctx, so that autograd frees them as soon as backward has run.
    ctx.save_for_backward(*output[4:])


def _backward(ctx, g_loss, _g_kd, _g_ce, _g_n, _g_h, _g_w, _g_b):
    inputs = ctx.inputs
    want = inputs[7]
    reduction = inputs[20]
    if reduction != "none":
        grads = [t * g_loss.to(t.dtype) if w else None
                 for t, w in zip(ctx.saved_tensors, want, strict=True)]
    else:
        opts = list(inputs[_FWD_OPTION_SLICE])
        del opts[10]  # reduction
        del opts[-1]  # return_components
        grads = list(fused_linear_kd_backward_op(*inputs[:10], g_loss, *opts))
        grads = [t if w else None for t, w in zip(grads, want, strict=True)]
    if inputs[2] is None:
        grads[2] = None
    return (*grads, *([None] * (len(inputs) - 3)))


fused_linear_kd_op.register_autograd(_backward, setup_context=_setup_context)


def fused(h, w, bs, g, u, bt, labels, opts: KDOptions, cd_s, cd_t):
    """Call the op from the public API (under torch.compile)."""
    want = [h.requires_grad, w.requires_grad, bs is not None and bs.requires_grad]
    return fused_linear_kd_op(
        h, w, bs, g, u, bt, labels, want, cd_s, cd_t, opts.divergence, opts.beta, opts.skew,
        opts.temperature, opts.scale_by_t2, opts.kd_weight, opts.ce_weight,
        opts.student_softcap, opts.teacher_softcap, opts.ignore_index, opts.reduction,
        opts.num_items, opts.chunk_size, opts.max_workspace_bytes, opts.impl,
        opts.return_components)


@torch.library.custom_op(f"{_NAMESPACE}::kd_loss", mutates_args=())
def kd_loss_op(
    zs: Tensor, zt: Tensor, labels: Optional[Tensor], want_grad: bool, divergence: str,
    beta: float, skew: float, temperature: float, scale_by_t2: bool, kd_weight: float,
    ce_weight: float, student_softcap: Optional[float], teacher_softcap: Optional[float],
    ignore_index: int, reduction: str, num_items: Optional[float], chunk_size: Optional[int],
    max_workspace_bytes: Optional[int], impl: str, return_components: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, kd, ce, n_tokens, grad) on flat logits zs [N, Vs], zt [N, Vt]; grad is the
    gradient w.r.t. zs for grad_output = 1 (per row for reduction='none'), or an empty
    tensor when not wanted."""
    opts = _options(divergence, beta, skew, temperature, scale_by_t2, kd_weight, ce_weight,
                    student_softcap, teacher_softcap, ignore_index, reduction, num_items,
                    chunk_size, max_workspace_bytes, impl, return_components)
    check_label_range(labels, min(zs.shape[1], zt.shape[1]), ignore_index)
    plan = _plan(zs, labels, opts, zs.dtype, zt.dtype, rows_dtype=zs.dtype)
    out = logits_forward(zs, zt, labels, plan, want_grad)
    return (out.loss, out.kd, out.ce, torch.tensor(out.kept, device=zs.device),
            zs.new_empty(0) if out.grad is None else out.grad)


@kd_loss_op.register_fake
def _fake_kd_loss(zs, zt, labels, want_grad, divergence, beta, skew, temperature,
                  scale_by_t2, kd_weight, ce_weight, student_softcap, teacher_softcap,
                  ignore_index, reduction, *args):
    acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
    shape = (zs.shape[0],) if reduction == "none" else ()
    return (zs.new_empty(shape, dtype=acc), zs.new_empty(shape, dtype=acc),
            zs.new_empty(shape, dtype=acc), zs.new_empty((), dtype=torch.int64),
            torch.empty_like(zs, memory_format=torch.contiguous_format) if want_grad
            else zs.new_empty(0))


def _setup_kd_loss(ctx, inputs, output):
    ctx.want_grad = inputs[3]
    ctx.mark_non_differentiable(*output[1:])  # kd, ce, n_tokens, grad: as eager
    # Saved, not kept on ctx, so that autograd frees it as soon as backward has run.
    ctx.save_for_backward(output[4])


def _backward_kd_loss(ctx, g_loss, _g_kd, _g_ce, _g_n, _g_grad):
    (grad,) = ctx.saved_tensors
    gz = None
    if ctx.want_grad:  # per-row grad_output for reduction='none', else a scalar
        go = g_loss.to(grad.dtype)
        gz = grad * (go[:, None] if go.dim() else go)
    return (gz, *([None] * 19))


kd_loss_op.register_autograd(_backward_kd_loss, setup_context=_setup_kd_loss)


def logits(zs: Tensor, zt: Tensor, labels: Optional[Tensor], opts: KDOptions, want_grad: bool):
    """Call the logits op from the public API (under torch.compile)."""
    return kd_loss_op(
        zs, zt, labels, want_grad, opts.divergence, opts.beta, opts.skew, opts.temperature,
        opts.scale_by_t2, opts.kd_weight, opts.ce_weight, opts.student_softcap,
        opts.teacher_softcap, opts.ignore_index, opts.reduction, opts.num_items,
        opts.chunk_size, opts.max_workspace_bytes, opts.impl, opts.return_components)
