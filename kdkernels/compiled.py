"""torch.compile support: each loss as one opaque custom op.

Dynamo cannot trace the chunk driver (data-dependent row counts, host-side checks), so
under torch.compile the public functions route here: the ops run the same eager code
(autograd.fused_forward, autograd.logits_forward) and register a fake impl for tracing and an
autograd formula that scales the gradients computed during forward (the fused loss
recomputes them for reduction='none').

The loss options cross the op boundary as one object: each schema ends with the fields of
KDOptions, derived from ``dataclasses.fields``, and every function here reads its arguments
by name. A new option needs nothing in this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .autograd import Plan, fused_forward, logits_forward, row_spec
from .backends import registry
from .gemm import logits_dtype
from .options import KDOptions, option_fields
from .reducer import LOCAL

_NAMESPACE = "kdkernels"
# Schema types of the KDOptions field annotations (a new type needs a row here).
_SCHEMA_TYPES = {"str": "str", "float": "float", "bool": "bool", "int": "int",
                 "float | None": "float?", "int | None": "int?"}


def _option_schema() -> tuple[tuple[str, ...], str]:
    parts = []
    for f in option_fields():
        if f.type not in _SCHEMA_TYPES:
            raise TypeError(f"KDOptions.{f.name}: no torch.library schema type for {f.type!r}; "
                            f"add one to compiled._SCHEMA_TYPES")
        parts.append(f"{_SCHEMA_TYPES[f.type]} {f.name}")
    return tuple(f.name for f in option_fields()), ", ".join(parts)


OPTION_NAMES, _OPTIONS = _option_schema()


class _Schema:
    """One op's arguments: the leading ones spelled here, then every option."""

    def __init__(self, name: str, leading: str, returns: str) -> None:
        self.name = name
        self.leading = tuple(arg.split()[-1] for arg in leading.split(", "))
        self.names = (*self.leading, *OPTION_NAMES)
        self.text = f"({leading}, {_OPTIONS}) -> {returns}"

    def bind(self, args: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(self.names, args, strict=True))

    def call(self, op, lead: dict[str, Any], opts: KDOptions) -> Any:
        return op(*(lead[n] for n in self.leading), *opts.values())


def _options(bound: dict[str, Any], **override: Any) -> KDOptions:
    return KDOptions(**{**{n: bound[n] for n in OPTION_NAMES}, **override})


def _plan(h: Tensor, labels: Tensor | None, opts: KDOptions, cd_s, cd_t, label_vocab: int,
          rows_dtype: torch.dtype | None = None) -> Plan:
    """rows_dtype: the dtype the row kernels see (the logits' for kd_loss; by default the
    fused loss's chunk-logits dtype)."""
    spec = row_spec(opts, labels)
    ld = logits_dtype(cd_s, h.device) if rows_dtype is None else rows_dtype
    backend = registry.select(opts.impl, h.device, ld, spec)
    return Plan(opts, spec, backend, LOCAL, cd_s, cd_t, label_vocab)


def _empty_for_missing(like: Tensor, grads) -> tuple[Tensor, ...]:
    # Outputs may not alias each other: a fresh empty tensor per missing gradient.
    return tuple(like.new_empty(0) if t is None else t for t in grads)


_HEADS = ("Tensor h, Tensor w, Tensor? bs, Tensor g, Tensor u, Tensor? bt, Tensor? labels, "
          "bool[] want, ScalarType cd_s, ScalarType cd_t")
FUSED = _Schema("fused_linear_kd", _HEADS, "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
                "Tensor)")
FUSED_BACKWARD = _Schema("fused_linear_kd_backward", _HEADS + ", Tensor grad_rows",
                         "(Tensor, Tensor, Tensor)")
LOGITS = _Schema("kd_loss", "Tensor zs, Tensor zt, Tensor? labels, bool want_grad",
                 "(Tensor, Tensor, Tensor, Tensor, Tensor)")


def _run_fused(a: dict[str, Any], opts: KDOptions):
    vocab = min(a["w"].shape[0], a["u"].shape[0])
    plan = _plan(a["h"], a["labels"], opts, a["cd_s"], a["cd_t"], vocab)
    return fused_forward(*(a[n] for n in ("h", "w", "bs", "g", "u", "bt", "labels")), plan,
                         *a["want"])


def _fake_grads(a: dict[str, Any], computed: bool) -> tuple[Tensor, ...]:
    h, w, bs, want = a["h"], a["w"], a["bs"], a["want"]
    return (torch.empty_like(h) if computed and want[0] else h.new_empty(0),
            torch.empty_like(w) if computed and want[1] else h.new_empty(0),
            torch.empty_like(bs) if computed and want[2] and bs is not None
            else h.new_empty(0))


def _fused_impl(*args: Any) -> tuple[Tensor, ...]:
    """(loss, kd, ce, n_tokens, grad_h, grad_w, grad_b); a gradient not computed in forward
    (not wanted, or reduction='none') is an empty tensor."""
    a = FUSED.bind(args)
    out = _run_fused(a, _options(a))
    return (out.loss, out.kd, out.ce, torch.tensor(out.kept, device=a["h"].device),
            *_empty_for_missing(a["h"], out.grads or (None, None, None)))


def _fused_fake(*args: Any) -> tuple[Tensor, ...]:
    a = FUSED.bind(args)
    h = a["h"]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    eager = a["reduction"] != "none"
    shape = (h.shape[0],) if not eager else ()
    return (h.new_empty(shape, dtype=acc), h.new_empty(shape, dtype=acc),
            h.new_empty(shape, dtype=acc), h.new_empty((), dtype=torch.int64),
            *_fake_grads(a, eager))


def _fused_backward_impl(*args: Any) -> tuple[Tensor, ...]:
    """Gradients of reduction='none' for per-row grad_output ``grad_rows`` (recomputed)."""
    a = FUSED_BACKWARD.bind(args)
    out = _run_fused(a, _options(a, reduction="none", return_components=False))
    return _empty_for_missing(a["h"], out.recompute(a["grad_rows"]))


def _fused_backward_fake(*args: Any) -> tuple[Tensor, ...]:
    return _fake_grads(FUSED_BACKWARD.bind(args), True)


def _define(schema: _Schema, body, fake):
    op = torch.library.custom_op(f"{_NAMESPACE}::{schema.name}", body, mutates_args=(),
                                 schema=schema.text)
    op.register_fake(fake)
    return op


fused_linear_kd_op = _define(FUSED, _fused_impl, _fused_fake)
fused_linear_kd_backward_op = _define(FUSED_BACKWARD, _fused_backward_impl,
                                      _fused_backward_fake)


def _setup_fused(ctx, inputs, output):
    ctx.args = FUSED.bind(inputs)
    ctx.mark_non_differentiable(*output[1:])  # kd, ce, n_tokens, the grads: as eager
    # Saved, not kept on ctx, so that autograd frees them as soon as backward has run.
    ctx.save_for_backward(*output[4:])


def _backward_fused(ctx, g_loss, _g_kd, _g_ce, _g_n, _g_h, _g_w, _g_b):
    a = ctx.args
    want = a["want"]
    if a["reduction"] != "none":
        grads = [t * g_loss.to(t.dtype) if w else None
                 for t, w in zip(ctx.saved_tensors, want, strict=True)]
    else:
        grads = list(FUSED_BACKWARD.call(fused_linear_kd_backward_op,
                                         {**a, "grad_rows": g_loss}, _options(a)))
        grads = [t if w else None for t, w in zip(grads, want, strict=True)]
    if a["bs"] is None:
        grads[2] = None
    return (*grads, *([None] * (len(FUSED.names) - 3)))


fused_linear_kd_op.register_autograd(_backward_fused, setup_context=_setup_fused)


def fused(h, w, bs, g, u, bt, labels, opts: KDOptions, cd_s, cd_t):
    """Call the op from the public API (under torch.compile)."""
    want = [h.requires_grad, w.requires_grad, bs is not None and bs.requires_grad]
    lead = dict(h=h, w=w, bs=bs, g=g, u=u, bt=bt, labels=labels, want=want, cd_s=cd_s,
                cd_t=cd_t)
    return FUSED.call(fused_linear_kd_op, lead, opts)


def _logits_impl(*args: Any) -> tuple[Tensor, ...]:
    """(loss, kd, ce, n_tokens, grad) on flat logits zs [N, Vs], zt [N, Vt]; grad is the
    gradient w.r.t. zs for grad_output = 1 (per row for reduction='none'), or an empty
    tensor when not wanted."""
    a = LOGITS.bind(args)
    zs, zt, labels = a["zs"], a["zt"], a["labels"]
    opts = _options(a)
    plan = _plan(zs, labels, opts, zs.dtype, zt.dtype, min(zs.shape[1], zt.shape[1]),
                 rows_dtype=zs.dtype)
    out = logits_forward(zs, zt, labels, plan, a["want_grad"])
    return (out.loss, out.kd, out.ce, torch.tensor(out.kept, device=zs.device),
            zs.new_empty(0) if out.grad is None else out.grad)


def _logits_fake(*args: Any) -> tuple[Tensor, ...]:
    a = LOGITS.bind(args)
    zs = a["zs"]
    acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
    shape = (zs.shape[0],) if a["reduction"] == "none" else ()
    return (zs.new_empty(shape, dtype=acc), zs.new_empty(shape, dtype=acc),
            zs.new_empty(shape, dtype=acc), zs.new_empty((), dtype=torch.int64),
            torch.empty_like(zs, memory_format=torch.contiguous_format) if a["want_grad"]
            else zs.new_empty(0))


kd_loss_op = _define(LOGITS, _logits_impl, _logits_fake)


def _setup_logits(ctx, inputs, output):
    ctx.want_grad = LOGITS.bind(inputs)["want_grad"]
    ctx.mark_non_differentiable(*output[1:])  # kd, ce, n_tokens, grad: as eager
    # Saved, not kept on ctx, so that autograd frees it as soon as backward has run.
    ctx.save_for_backward(output[4])


def _backward_logits(ctx, g_loss, _g_kd, _g_ce, _g_n, _g_grad):
    (grad,) = ctx.saved_tensors
    gz = None
    if ctx.want_grad:  # per-row grad_output for reduction='none', else a scalar
        go = g_loss.to(grad.dtype)
        gz = grad * (go[:, None] if go.dim() else go)
    return (gz, *([None] * (len(LOGITS.names) - 1)))


kd_loss_op.register_autograd(_backward_logits, setup_context=_setup_logits)


def logits(zs: Tensor, zt: Tensor, labels: Tensor | None, opts: KDOptions, want_grad: bool):
    """Call the logits op from the public API (under torch.compile)."""
    return LOGITS.call(kd_loss_op, dict(zs=zs, zt=zt, labels=labels, want_grad=want_grad),
                       opts)

