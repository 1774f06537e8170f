"""torch.compile support of the dense-teacher losses: the ops of engine/custom_ops.py over
the eager Functions' code (fused_forward, logits_forward) and the KDOptions fields."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..backends import registry
from ..engine.autograd import row_spec
from ..engine.custom_ops import FusedOp, LogitsOp
from ..engine.gemm import logits_dtype
from ..engine.local_reducer import LOCAL
from ..options import KDOptions
from .autograd import fused_forward, logits_forward
from .plan import Plan


def _plan(h: Tensor, labels: Tensor | None, opts: KDOptions, cd_s, cd_t, label_vocab: int,
          rows_dtype: torch.dtype | None = None) -> Plan:
    """rows_dtype: the dtype the row kernels see (the logits' for kd_loss; by default the
    fused loss's chunk-logits dtype)."""
    spec = row_spec(opts, labels)
    ld = logits_dtype(cd_s, h.device) if rows_dtype is None else rows_dtype
    backend = registry.select(opts.impl, h.device, ld, spec)
    return Plan(opts, spec, backend, LOCAL, cd_s, cd_t, label_vocab)


def _run_fused(a: dict[str, Any], opts: KDOptions):
    vocab = min(a["w"].shape[0], a["u"].shape[0])
    plan = _plan(a["h"], a["labels"], opts, a["cd_s"], a["cd_t"], vocab)
    return fused_forward(*(a[n] for n in ("h", "w", "bs", "g", "u", "bt", "labels")), plan,
                         *a["want"])


def _run_logits(a: dict[str, Any], opts: KDOptions):
    zs, zt, labels = a["zs"], a["zt"], a["labels"]
    plan = _plan(zs, labels, opts, zs.dtype, zt.dtype, min(zs.shape[1], zt.shape[1]),
                 rows_dtype=zs.dtype)
    return logits_forward(zs, zt, labels, plan, a["want_grad"])


FUSED_OP = FusedOp("fused_linear_kd", "Tensor h, Tensor w, Tensor? bs, Tensor g, Tensor u, "
                   "Tensor? bt, Tensor? labels, bool[] want, ScalarType cd_s, "
                   "ScalarType cd_t", _run_fused)
LOGITS_OP = LogitsOp("kd_loss", "Tensor zs, Tensor zt, Tensor? labels, bool want_grad",
                     _run_logits)
FUSED, FUSED_BACKWARD, LOGITS = FUSED_OP.schema, FUSED_OP.backward_schema, LOGITS_OP.schema
fused_linear_kd_op, fused_linear_kd_backward_op = FUSED_OP.op, FUSED_OP.backward_op
kd_loss_op = LOGITS_OP.op


def fused(h, w, bs, g, u, bt, labels, opts: KDOptions, cd_s, cd_t):
    """Call the op from the public API (under torch.compile)."""
    return FUSED_OP(dict(h=h, w=w, bs=bs, g=g, u=u, bt=bt, labels=labels, cd_s=cd_s,
                         cd_t=cd_t), opts)


def logits(zs: Tensor, zt: Tensor, labels: Tensor | None, opts: KDOptions, want_grad: bool):
    """Call the logits op from the public API (under torch.compile)."""
    return LOGITS_OP(dict(zs=zs, zt=zt, labels=labels, want_grad=want_grad), opts)
