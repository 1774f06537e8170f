"""What every loss's autograd Functions share (the dense and the sparse teacher alike).

The loss is terminal, so the gradient is computed during forward and backward only scales it
by grad_output. With reduction='none' a fused loss cannot pre-scale per row, so its backward
re-runs the chunk driver with grad_output as row weights (``FusedOutcome.recompute``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backends.base import RowSpec
from ..options import KDOptions
from .driver import ChunkRun, RowResult


def normaliser(opts: KDOptions, kept: int) -> float:
    if opts.reduction != "mean":
        return 1.0
    return opts.num_items if opts.num_items is not None else float(max(kept, 1))


def reduce_rows(rows: torch.Tensor, opts: KDOptions, norm: float) -> torch.Tensor:
    return rows.sum() / norm if opts.reduction != "none" else rows


def combine(opts: KDOptions, kd: torch.Tensor, ce: torch.Tensor | None) -> torch.Tensor:
    rows = kd * opts.soft_scale
    if ce is not None and opts.ce_weight > 0:
        rows = rows + opts.ce_weight * ce
    return rows


def scatter_rows(rows: torch.Tensor | None, idx: torch.Tensor | None,
                 n: int) -> torch.Tensor | None:
    if rows is None or idx is None:
        return rows
    out = torch.zeros((n, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    return out.index_copy_(0, idx, rows)


def scale_grad(grad: torch.Tensor | None, go: torch.Tensor) -> torch.Tensor | None:
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


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def run_fused(rows: Callable[[ChunkRun], RowResult], run: ChunkRun, h, w, bs, vocab: int,
              opts: KDOptions, has_ce: bool) -> FusedOutcome:
    """Reductions and gradients of a fused loss whose kept rows ``rows`` computes for a run of
    the chunk loop (``run`` with the row scale of the pass set): the dense and the sparse
    teacher alike."""
    n = h.shape[0]
    idx, kept = run.idx, run.n_kept
    norm = normaliser(opts, kept)
    shapes = (h.shape, h.dtype, w.shape, w.dtype, None if bs is None else bs.dtype)
    want_b = run.want_b and bs is not None
    acc = run.acc_dtype

    def grads_for(go):
        if not kept:
            return full_grads(None, n, shapes, vocab, h.device, want_b)
        res = rows(dataclasses.replace(run, row_scale=go if idx is None
                                       else go.index_select(0, idx)))
        return full_grads(res, n, shapes, vocab, h.device, want_b)

    eager_grad = opts.reduction != "none" and (run.want_h or run.want_w or want_b)
    if kept:
        res = rows(dataclasses.replace(run, row_scale=1.0 / norm if eager_grad else None))
        kd, ce, entropy = res.kd, res.ce, res.entropy
    else:
        res = None
        kd = entropy = torch.zeros(0, dtype=acc, device=h.device)
        ce = torch.zeros(0, dtype=acc, device=h.device) if has_ce else None

    def reduce(x):
        return reduce_rows(scatter_rows(x, idx, n) if opts.reduction == "none" else x, opts, norm)

    loss, kd_red = reduce(combine(opts, kd, ce)), reduce(kd)
    ce_red = torch.full_like(kd_red, float("nan")) if ce is None else reduce(ce)
    grads = None
    if eager_grad:
        grads = full_grads(res, n, shapes, vocab, h.device, want_b)
    return FusedOutcome(loss, kd_red, ce_red, kept, grads,
                        None if eager_grad else grads_for, reduce(entropy))


def kept_count(kept: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(kept, dtype=torch.int64, device=device)


def save_fused(ctx, out: FusedOutcome, device: torch.device) -> tuple:
    """A fused Function's forward outputs (loss, kd, ce, n_tokens, entropy), saving what its
    backward needs (``fused_backward``)."""
    ctx.recompute = out.recompute
    # Saved (not kept on ctx) so that autograd releases them right after backward and
    # AccumulateGrad adopts them as .grad instead of cloning (a ctx attribute would keep
    # a second reference alive: one more [V, D] copy at the peak).
    ctx.save_for_backward(*(out.grads or (None, None, None)))
    n_tokens = kept_count(out.kept, device)
    ctx.mark_non_differentiable(out.kd, out.ce, n_tokens, out.entropy)
    return out.loss, out.kd, out.ce, n_tokens, out.entropy


def fused_backward(ctx, go) -> tuple:
    """(grad_h, grad_w, grad_b) of a fused Function for grad_output ``go``."""
    if ctx.recompute is None:
        return tuple(scale_grad(t, go) for t in ctx.saved_tensors)
    return tuple(ctx.recompute(go))


def full_grads(res: RowResult | None, n, shapes, vocab, device, want_b=True):
    """Gradients in the inputs' shapes and dtypes (zeros for ignored rows, padded vocab)."""
    h_shape, h_dtype, w_shape, w_dtype, b_dtype = shapes
    b_dtype = b_dtype if want_b else None
    gh = gw = gb = None
    if res is None or res.grad_h is not None:
        gh = (torch.zeros(h_shape, dtype=h_dtype, device=device) if res is None
              else res.grad_h.to(h_dtype))
    if res is None or res.grad_w is not None:
        gw = in_shape(None if res is None else res.grad_w, w_shape, w_dtype, vocab, device)
    if b_dtype is not None and (res is None or res.grad_b is not None):
        gb = in_shape(None if res is None else res.grad_b, (w_shape[0],), b_dtype, vocab,
                       device)
    if res is not None:  # drop the fp32 accumulators now, not when the caller returns
        res.grad_h = res.grad_w = res.grad_b = None
    return gh, gw, gb


def in_shape(acc, shape, dtype, vocab, device) -> torch.Tensor:
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


def save_logits(ctx, out: LogitsOutcome, device: torch.device) -> tuple:
    """A logits Function's forward outputs, saving the gradient for ``scale_grad`` in backward."""
    ctx.save_for_backward(out.grad)  # released after backward: adopted as .grad, not cloned
    n_tokens = kept_count(out.kept, device)
    ctx.mark_non_differentiable(out.kd, out.ce, n_tokens, out.entropy)
    return out.loss, out.kd, out.ce, n_tokens, out.entropy


def row_spec(opts: KDOptions, labels: torch.Tensor | None) -> RowSpec:
    """The row kernels' spec; with return_components, CE is computed for monitoring even at
    ce_weight = 0. The student entropy is only reported with return_components, so only then
    do the stats passes pay for it (about 15% of the pass on CPUs)."""
    spec = RowSpec.from_options(opts, labels is not None, opts.return_components)
    if labels is not None and opts.return_components and not spec.has_ce:
        spec = dataclasses.replace(spec, has_ce=True)
    return spec
