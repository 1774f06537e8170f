"""torch.compile support: each loss as one opaque custom op.

Dynamo cannot trace the chunk driver (data-dependent row counts, host-side checks), so
under torch.compile the public functions route here: the ops run the same eager code
(dense/ and sparse/ autograd's forwards) and register a fake impl for tracing and an
autograd formula that scales the gradients computed during forward (the fused loss
recomputes them for reduction='none').

The loss options cross the op boundary as one object: each schema ends with the fields of
the options dataclass (KDOptions for dense/compiled.py; TopKOptions for
sparse/compiled.py), derived from ``dataclasses.fields``, and every function here reads its
arguments by name. A new option needs nothing in this module. ``FusedOp`` and ``LogitsOp``
build an op, its fake, its backward and its autograd registration from an eager run.

Options that change between calls (a temperature schedule, a beta sweep, num_items per
step) are kept symbolic rather than specialised. Dynamo compiles a Python float argument
as a constant first and, when a call brings another value, once more as a symbolic float
(automatic dynamic), which then serves every later value. Two things make that graph hold:

* KDOptions defers its checks and folds while dynamo traces (``options.is_symbolic``):
  math.isfinite cannot trace a symbol, and a comparison would guard on the value.
* The float options cross the op boundary as 0-d float64 CPU tensors (schema ``Tensor``),
  made as ``ones * value``. A ``float`` or ``Scalar`` schema argument is specialised
  (dynamo's tensorify pass keeps a float symbolic only where it enters tensor
  arithmetic): a guard on the exact value, i.e. a recompile for every value of the
  schedule until dynamo's recompile limit. On CPU, reading the value back costs no sync.

So a schedule compiles twice (static, then dynamic), and every later value runs the same
graph. The op's real implementation reads the concrete values and rebuilds the options
dataclass (``_Schema.options``): a bad value passed on a later call raises the eager
ValueError, naming the option, when the graph runs (a NaN is the exception that
recompiles: dynamo guards float inputs against NaN itself). Deliberate specialisation
(a guard per value) was the alternative; it is what the int options get (schema ``int``:
ignore_index, chunk_size, max_workspace_bytes), which a training run does not schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..options import KDOptions, option_fields

_NAMESPACE = "kdkernels"
# Schema types of the KDOptions field annotations (a new type needs a row here). Float
# options travel as 0-d float64 tensors, so that a symbolic one stays symbolic (above).
_SCHEMA_TYPES = {"str": "str", "float": "Tensor", "bool": "bool", "int": "int",
                 "float | None": "Tensor?", "int | None": "int?"}
_AS_TENSOR = frozenset({"float", "float | None"})


def _option_schema(fields: tuple) -> tuple[tuple[str, ...], str, frozenset[str]]:
    """(names, schema text, names of the options carried as tensors)."""
    parts = []
    for f in fields:
        if f.type not in _SCHEMA_TYPES:
            raise TypeError(f"option {f.name}: no torch.library schema type for {f.type!r}; "
                            f"add one to engine/custom_ops._SCHEMA_TYPES")
        parts.append(f"{_SCHEMA_TYPES[f.type]} {f.name}")
    tensors = frozenset(f.name for f in fields if f.type in _AS_TENSOR)
    return tuple(f.name for f in fields), ", ".join(parts), tensors


OPTION_NAMES, _OPTIONS, _TENSOR_OPTIONS = _option_schema(option_fields())


def _to_op(value: Any) -> Tensor | None:
    """A float option as the op takes it: an exact float64 0-d tensor. ``ones * value``,
    not ``torch.tensor(value)``: only arithmetic lets the tensorify pass turn a symbolic
    float back into the graph's float input; anything else specialises it."""
    return None if value is None else torch.ones((), dtype=torch.float64) * value


def _from_op(value: Any) -> Any:
    """The concrete number in the op's real implementation (None stays None)."""
    return value.item() if isinstance(value, Tensor) else value


class _Schema:
    """One op's arguments: the leading ones spelled here, then every option of the options
    dataclass ``kind`` (KDOptions unless given) in field order."""

    def __init__(self, name: str, leading: str, returns: str, kind: type = KDOptions,
                 fields: tuple | None = None) -> None:
        option_names, options, tensors = ((OPTION_NAMES, _OPTIONS, _TENSOR_OPTIONS)
                                          if fields is None else _option_schema(fields))
        self.name, self.kind, self.option_names = name, kind, option_names
        self.tensor_options = tensors
        self.leading = tuple(arg.split()[-1] for arg in leading.split(", "))
        self.names = (*self.leading, *option_names)
        self.text = f"({leading}, {options}) -> {returns}"

    def bind(self, args: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(self.names, args, strict=True))

    def option_args(self, opts) -> tuple:
        """The op's trailing arguments for the options ``opts`` (each float a tensor)."""
        return tuple(_to_op(v) if n in self.tensor_options else v
                     for n, v in zip(self.option_names, opts.values(), strict=True))

    def call(self, op, lead: dict[str, Any], opts) -> Any:
        return op(*(lead[n] for n in self.leading), *self.option_args(opts))

    def call_bound(self, op, bound: dict[str, Any]) -> Any:
        """Call ``op`` with the arguments of this schema, bound by name."""
        return op(*(bound[n] for n in self.names))

    def options(self, bound: dict[str, Any], **override: Any):
        """The options dataclass from concrete op arguments (in the real implementation):
        its checks raise here for a value that was symbolic while tracing."""
        return self.kind(**{**{n: _from_op(bound[n]) for n in self.option_names}, **override})


def _empty_for_missing(like: Tensor, grads) -> tuple[Tensor, ...]:
    # Outputs may not alias each other: a fresh empty tensor per missing gradient.
    return tuple(like.new_empty(0) if t is None else t for t in grads)


def _define(schema: _Schema, body, fake):
    op = torch.library.custom_op(f"{_NAMESPACE}::{schema.name}", body, mutates_args=(),
                                 schema=schema.text)
    op.register_fake(fake)
    return op


_FUSED_RETURNS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"


_GRADS = 5  # the index of the first gradient output of either op


class FusedOp:
    """A fused-linear loss as a custom op: (loss, kd, ce, n_tokens, entropy, grad_h, grad_w,
    grad_b)
    with its fake, and a backward op that recomputes the gradients for reduction='none'.
    ``run(bound_args, opts) -> autograd.FusedOutcome`` is the eager loss; the leading
    arguments start with ``Tensor h, Tensor w, Tensor? bs`` and hold ``bool[] want``."""

    def __init__(self, name: str, heads: str, run, kind: type = KDOptions,
                 fields: tuple | None = None) -> None:
        self.schema = _Schema(name, heads, _FUSED_RETURNS, kind, fields)
        self.backward_schema = _Schema(f"{name}_backward", heads + ", Tensor grad_rows",
                                       "(Tensor, Tensor, Tensor)", kind, fields)
        self.run = run
        self.op = _define(self.schema, self._impl, self._fake)
        self.backward_op = _define(self.backward_schema, self._backward_impl,
                                   self._backward_fake)
        self.op.register_autograd(self._backward, setup_context=self._setup)

    def _impl(self, *args: Any) -> tuple[Tensor, ...]:
        """A gradient not computed in forward (not wanted, or reduction='none') is an empty
        tensor."""
        a = self.schema.bind(args)
        out = self.run(a, self.schema.options(a))
        return (out.loss, out.kd, out.ce, torch.tensor(out.kept, device=a["h"].device),
                out.entropy, *_empty_for_missing(a["h"], out.grads or (None, None, None)))

    @staticmethod
    def _fake_grads(a: dict[str, Any], computed: bool) -> tuple[Tensor, ...]:
        h, w, bs, want = a["h"], a["w"], a["bs"], a["want"]
        return (torch.empty_like(h) if computed and want[0] else h.new_empty(0),
                torch.empty_like(w) if computed and want[1] else h.new_empty(0),
                torch.empty_like(bs) if computed and want[2] and bs is not None
                else h.new_empty(0))

    def _fake(self, *args: Any) -> tuple[Tensor, ...]:
        a = self.schema.bind(args)
        h = a["h"]
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        eager = a["reduction"] != "none"
        shape = (h.shape[0],) if not eager else ()
        return (h.new_empty(shape, dtype=acc), h.new_empty(shape, dtype=acc),
                h.new_empty(shape, dtype=acc), h.new_empty((), dtype=torch.int64),
                h.new_empty(shape, dtype=acc), *self._fake_grads(a, eager))

    def _backward_impl(self, *args: Any) -> tuple[Tensor, ...]:
        """Gradients of reduction='none' for per-row grad_output ``grad_rows``."""
        a = self.backward_schema.bind(args)
        out = self.run(a, self.backward_schema.options(a, reduction="none",
                                                        return_components=False))
        return _empty_for_missing(a["h"], out.recompute(a["grad_rows"]))

    def _backward_fake(self, *args: Any) -> tuple[Tensor, ...]:
        return self._fake_grads(self.backward_schema.bind(args), True)

    def _setup(self, ctx, inputs, output):
        ctx.args = self.schema.bind(inputs)
        # kd, ce, n_tokens, entropy, the grads: as eager
        ctx.mark_non_differentiable(*output[1:])
        # Saved, not kept on ctx, so that autograd frees them as soon as backward has run.
        ctx.save_for_backward(*output[_GRADS:])

    def _backward(self, ctx, g_loss, _g_kd, _g_ce, _g_n, _g_ent, _g_h, _g_w, _g_b):
        a = ctx.args
        want = a["want"]
        if a["reduction"] != "none":
            grads = [t * g_loss.to(t.dtype) if w else None
                     for t, w in zip(ctx.saved_tensors, want, strict=True)]
        else:
            # The option tensors as bound: rebuilding the options here would read symbols.
            grads = list(self.backward_schema.call_bound(self.backward_op,
                                                         {**a, "grad_rows": g_loss}))
            grads = [t if w else None for t, w in zip(grads, want, strict=True)]
        if a["bs"] is None:
            grads[2] = None
        return (*grads, *([None] * (len(self.schema.names) - 3)))

    def __call__(self, lead: dict[str, Any], opts) -> Any:
        """Call the op from a public function (under torch.compile)."""
        h, w, bs = lead["h"], lead["w"], lead["bs"]
        want = [h.requires_grad, w.requires_grad, bs is not None and bs.requires_grad]
        return self.schema.call(self.op, {**lead, "want": want}, opts)


_LOGITS_RETURNS = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"


class LogitsOp:
    """A loss on materialised student logits ``zs`` as a custom op: (loss, kd, ce, n_tokens,
    entropy, grad), grad w.r.t. zs for grad_output = 1 (per row for reduction='none') or an empty
    tensor when not wanted. ``run(bound_args, opts) -> autograd.LogitsOutcome``; the
    leading arguments start with ``Tensor zs`` and end with ``bool want_grad``."""

    def __init__(self, name: str, leading: str, run, kind: type = KDOptions,
                 fields: tuple | None = None) -> None:
        self.schema = _Schema(name, leading, _LOGITS_RETURNS, kind, fields)
        self.run = run
        self.op = _define(self.schema, self._impl, self._fake)
        self.op.register_autograd(self._backward, setup_context=self._setup)

    def _impl(self, *args: Any) -> tuple[Tensor, ...]:
        a = self.schema.bind(args)
        zs = a["zs"]
        out = self.run(a, self.schema.options(a))
        return (out.loss, out.kd, out.ce, torch.tensor(out.kept, device=zs.device),
                out.entropy, zs.new_empty(0) if out.grad is None else out.grad)

    def _fake(self, *args: Any) -> tuple[Tensor, ...]:
        a = self.schema.bind(args)
        zs = a["zs"]
        acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
        shape = (zs.shape[0],) if a["reduction"] == "none" else ()
        return (zs.new_empty(shape, dtype=acc), zs.new_empty(shape, dtype=acc),
                zs.new_empty(shape, dtype=acc), zs.new_empty((), dtype=torch.int64),
                zs.new_empty(shape, dtype=acc),
                torch.empty_like(zs, memory_format=torch.contiguous_format)
                if a["want_grad"] else zs.new_empty(0))

    def _setup(self, ctx, inputs, output):
        ctx.want_grad = self.schema.bind(inputs)["want_grad"]
        ctx.mark_non_differentiable(*output[1:])  # kd, ce, n_tokens, entropy, grad: as eager
        ctx.save_for_backward(output[_GRADS])  # freed by autograd right after backward

    def _backward(self, ctx, g_loss, _g_kd, _g_ce, _g_n, _g_ent, _g_grad):
        (grad,) = ctx.saved_tensors
        gz = None
        if ctx.want_grad:  # per-row grad_output for reduction='none', else a scalar
            go = g_loss.to(grad.dtype)
            gz = grad * (go[:, None] if go.dim() else go)
        return (gz, *([None] * (len(self.schema.names) - 1)))

    def __call__(self, lead: dict[str, Any], opts) -> Any:
        return self.schema.call(self.op, lead, opts)
