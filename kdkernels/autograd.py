"""Autograd Functions. The loss is terminal, so the gradient is computed during forward and
backward only scales it by grad_output. With reduction='none' the fused loss cannot
pre-scale per row, so its backward re-runs the chunk driver with grad_output as row weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .backends.base import Backend, RowSpec
from .driver import RowResult, fused_rows, logits_rows, plan_fused
from .options import KDOptions
from .reducer import Reducer
from .validation import scan_labels


def row_spec(opts: KDOptions, labels: torch.Tensor | None) -> RowSpec:
    """The row kernels' spec; with return_components, CE is computed for monitoring even at
    ce_weight = 0."""
    spec = RowSpec.from_options(opts, labels is not None)
    if labels is not None and opts.return_components and not spec.has_ce:
        spec = dataclasses.replace(spec, has_ce=True)
    return spec


@dataclass(frozen=True)
class Plan:
    """Everything the Functions need besides tensors."""

    opts: KDOptions
    spec: RowSpec
    backend: Backend
    reducer: Reducer
    compute_dtype_s: torch.dtype
    compute_dtype_t: torch.dtype
    label_vocab: int  # labels must be ids in [0, label_vocab) (the global shared vocabulary)


def _normaliser(opts: KDOptions, kept: int) -> float:
    if opts.reduction != "mean":
        return 1.0
    return opts.num_items if opts.num_items is not None else float(max(kept, 1))


def _reduce(rows: torch.Tensor, opts: KDOptions, norm: float) -> torch.Tensor:
    return rows.sum() / norm if opts.reduction != "none" else rows


def _combine(opts: KDOptions, kd: torch.Tensor, ce: torch.Tensor | None) -> torch.Tensor:
    rows = kd * opts.soft_scale
    if ce is not None and opts.ce_weight > 0:
        rows = rows + opts.ce_weight * ce
    return rows


def _scatter(rows: torch.Tensor | None, idx: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if rows is None or idx is None:
        return rows
    out = torch.zeros((n, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    return out.index_copy_(0, idx, rows)


def _scale(grad: torch.Tensor | None, go: torch.Tensor) -> torch.Tensor | None:
    if grad is None:
        return None
    if go.dim() == 0:
        return grad if bool(go == 1) else grad * go.to(grad.dtype)
    return grad * go.to(grad.dtype)[:, None]


@dataclass
class FusedOutcome:
    """A forward pass of the fused loss: reduced outputs, and either the gradients already
    scaled for grad_output = 1 (``grads``) or a function of grad_output computing them."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    kept: int
    grads: tuple | None
    recompute: Callable[[torch.Tensor], tuple] | None
    entropy: torch.Tensor  # the student's tempered entropy, reduced like kd


def fused_forward(h, w, bs, g, u, bt, labels, plan: Plan, want_h: bool, want_w: bool,
                  want_b: bool) -> FusedOutcome:
    """The fused loss on flat inputs h [N, Ds], g [N, Dt], labels [N] (plain tensors)."""
    opts, spec = plan.opts, plan.spec
    vocab = min(w.shape[0], u.shape[0])
    rows_kept = scan_labels(labels, h.shape[0], plan.label_vocab, opts.ignore_index)
    idx, kept = rows_kept.idx, rows_kept.kept
    cd_s, cd_t = plan.compute_dtype_s, plan.compute_dtype_t

    def rows(row_scale) -> RowResult:
        need_grad = row_scale is not None and (want_h or want_w or want_b)
        chunks = plan_fused(opts, plan.backend, plan.reducer, n_rows=kept, vocab=vocab,
                            ds=h.shape[1], dt=g.shape[1], h_dtype=h.dtype, g_dtype=g.dtype,
                            cd_s=cd_s, cd_t=cd_t, idx=idx, need_grad=need_grad,
                            want_h=want_h, device=h.device)
        # Heads cut to the shared vocabulary (views), cast only where the GEMMs need it.
        return fused_rows(h, w[:vocab].to(cd_s), None if bs is None else bs[:vocab], g,
                          u[:vocab].to(cd_t), None if bt is None else bt[:vocab], labels,
                          opts, spec, plan.backend,
                          idx=idx, n_kept=kept, chunks=chunks, cd_s=cd_s, cd_t=cd_t,
                          row_scale=row_scale, want_h=want_h, want_w=want_w, want_b=want_b,
                          reducer=plan.reducer, acc_dtype=_acc(h))

    return run_fused(rows, h, w, bs, rows_kept, vocab, opts, spec.has_ce, want_h, want_w,
                     want_b)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def run_fused(rows: Callable[[float | torch.Tensor | None], RowResult], h, w, bs,
              rows_kept, vocab: int, opts: KDOptions, has_ce: bool, want_h: bool,
              want_w: bool, want_b: bool) -> FusedOutcome:
    """Reductions and gradients of a fused loss whose kept rows ``rows(row_scale)`` computes
    (the dense and the sparse teacher alike)."""
    n = h.shape[0]
    idx, kept = rows_kept.idx, rows_kept.kept
    norm = _normaliser(opts, kept)
    shapes = (h.shape, h.dtype, w.shape, w.dtype, None if bs is None else bs.dtype)
    want_b = want_b and bs is not None
    acc = _acc(h)

    def grads_for(go):
        if not kept:
            return _full_grads(None, n, shapes, vocab, h.device, want_b)
        res = rows(go if idx is None else go.index_select(0, idx))
        return _full_grads(res, n, shapes, vocab, h.device, want_b)

    eager_grad = opts.reduction != "none" and (want_h or want_w or want_b)
    if kept:
        res = rows(1.0 / norm if eager_grad else None)
        kd, ce, entropy = res.kd, res.ce, res.entropy
    else:
        res = None
        kd = entropy = torch.zeros(0, dtype=acc, device=h.device)
        ce = torch.zeros(0, dtype=acc, device=h.device) if has_ce else None

    def reduce(x):
        return _reduce(_scatter(x, idx, n) if opts.reduction == "none" else x, opts, norm)

    loss, kd_red = reduce(_combine(opts, kd, ce)), reduce(kd)
    ce_red = torch.full_like(kd_red, float("nan")) if ce is None else reduce(ce)
    grads = None
    if eager_grad:
        grads = _full_grads(res, n, shapes, vocab, h.device, want_b)
    return FusedOutcome(loss, kd_red, ce_red, kept, grads,
                        None if eager_grad else grads_for, reduce(entropy))


def _kept_count(kept: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(kept, dtype=torch.int64, device=device)


def save_fused(ctx, out: FusedOutcome, device: torch.device) -> tuple:
    """A fused Function's forward outputs (loss, kd, ce, n_tokens, entropy), saving what its
    backward needs (``fused_backward``)."""
    ctx.recompute = out.recompute
    # Saved (not kept on ctx) so that autograd releases them right after backward and
    # AccumulateGrad adopts them as .grad instead of cloning (a ctx attribute would keep
    # a second reference alive: one more [V, D] copy at the peak).
    ctx.save_for_backward(*(out.grads or (None, None, None)))
    n_tokens = _kept_count(out.kept, device)
    ctx.mark_non_differentiable(out.kd, out.ce, n_tokens, out.entropy)
    return out.loss, out.kd, out.ce, n_tokens, out.entropy


def fused_backward(ctx, go) -> tuple:
    """(grad_h, grad_w, grad_b) of a fused Function for grad_output ``go``."""
    if ctx.recompute is None:
        return tuple(_scale(t, go) for t in ctx.saved_tensors)
    return tuple(ctx.recompute(go))


class FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, bs, g, u, bt, labels, plan: Plan):
        out = fused_forward(h, w, bs, g, u, bt, labels, plan, *ctx.needs_input_grad[:3])
        return save_fused(ctx, out, h.device)

    @staticmethod
    def backward(ctx, go, _gkd, _gce, _gn, _gent):
        return (*fused_backward(ctx, go), None, None, None, None, None)


def _full_grads(res: RowResult | None, n, shapes, vocab, device, want_b=True):
    """Gradients in the inputs' shapes and dtypes (zeros for ignored rows, padded vocab)."""
    h_shape, h_dtype, w_shape, w_dtype, b_dtype = shapes
    b_dtype = b_dtype if want_b else None
    gh = gw = gb = None
    if res is None or res.grad_h is not None:
        gh = (torch.zeros(h_shape, dtype=h_dtype, device=device) if res is None
              else res.grad_h.to(h_dtype))
    if res is None or res.grad_w is not None:
        gw = _in_shape(None if res is None else res.grad_w, w_shape, w_dtype, vocab, device)
    if b_dtype is not None and (res is None or res.grad_b is not None):
        gb = _in_shape(None if res is None else res.grad_b, (w_shape[0],), b_dtype, vocab,
                       device)
    if res is not None:  # drop the fp32 accumulators now, not when the caller returns
        res.grad_h = res.grad_w = res.grad_b = None
    return gh, gw, gb


def _in_shape(acc, shape, dtype, vocab, device) -> torch.Tensor:
    """An accumulator over the first ``vocab`` rows as a gradient of ``shape``/``dtype``:
    the accumulator itself when it already is one, else one cast (zero rows past vocab)."""
    if acc is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    if acc.shape[0] == shape[0]:
        return acc if acc.dtype == dtype else acc.to(dtype)
    out = torch.empty(shape, dtype=dtype, device=device)
    out[:vocab] = acc
    out[vocab:] = 0
    return out


@dataclass
class LogitsOutcome:
    """A forward pass of the logits loss: reduced outputs, the kept-token count, and the
    gradient w.r.t. zs for grad_output = 1 (None when not wanted)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    kept: int
    grad: torch.Tensor | None
    entropy: torch.Tensor  # the student's tempered entropy, reduced like kd


def logits_forward(zs, zt, labels, plan: Plan, want_grad: bool) -> LogitsOutcome:
    """The logits loss on flat inputs zs [N, Vs], zt [N, Vt], labels [N] (plain tensors).
    With reduction='none' the gradient is per row for unit weights, so backward can scale
    it row by row without a recompute."""
    opts = plan.opts
    n = zs.shape[0]
    rows_kept = scan_labels(labels, n, plan.label_vocab, opts.ignore_index)
    keep, kept = rows_kept.mask, rows_kept.kept
    norm = _normaliser(opts, kept)
    unit = 1.0 if opts.reduction == "none" else 1.0 / norm
    row_scale = None
    if want_grad:
        acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
        row_scale = torch.full((n,), unit, dtype=acc, device=zs.device)
        if keep is not None:
            row_scale = torch.where(keep, row_scale, torch.zeros_like(row_scale))
    kd, ce, entropy, grad = logits_rows(zs, zt, labels, opts, plan.spec, plan.backend,
                                        row_scale=row_scale, reducer=plan.reducer)
    if keep is not None:
        kd = torch.where(keep, kd, torch.zeros_like(kd))
        entropy = torch.where(keep, entropy, torch.zeros_like(entropy))
        ce = None if ce is None else torch.where(keep, ce, torch.zeros_like(ce))
    loss = _reduce(_combine(opts, kd, ce), opts, norm)
    kd_red = _reduce(kd, opts, norm)
    ce_red = torch.full_like(kd_red, float("nan")) if ce is None else _reduce(ce, opts, norm)
    return LogitsOutcome(loss, kd_red, ce_red, kept, grad, _reduce(entropy, opts, norm))


def save_logits(ctx, out: LogitsOutcome, device: torch.device) -> tuple:
    """A logits Function's forward outputs, saving the gradient for ``_scale`` in backward."""
    ctx.save_for_backward(out.grad)  # released after backward: adopted as .grad, not cloned
    n_tokens = _kept_count(out.kept, device)
    ctx.mark_non_differentiable(out.kd, out.ce, n_tokens, out.entropy)
    return out.loss, out.kd, out.ce, n_tokens, out.entropy


class LogitsKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, labels, plan: Plan):
        return save_logits(ctx, logits_forward(zs, zt, labels, plan, ctx.needs_input_grad[0]),
                           zs.device)

    @staticmethod
    def backward(ctx, go, _gkd, _gce, _gn, _gent):
        return _scale(ctx.saved_tensors[0], go), None, None, None
