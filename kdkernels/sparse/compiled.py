"""torch.compile support of the sparse-teacher losses: the ops of engine/custom_ops.py, over the
eager top-k Functions' code and the TopKOptions fields."""

from __future__ import annotations

from typing import Any

import torch

from ..backends import registry
from ..engine.autograd import row_spec
from ..engine.custom_ops import FusedOp, LogitsOp
from ..engine.gemm import logits_dtype
from ..engine.local_reducer import LOCAL
from .autograd import topk_fused_forward, topk_logits_forward
from .options import TopKOptions, topk_option_fields
from .plan import SparsePlan


def _plan(x: torch.Tensor, labels, opts: TopKOptions, cd, rows_dtype, vocab) -> SparsePlan:
    spec = row_spec(opts.dense, labels)
    backend = registry.select(opts.impl, x.device, rows_dtype, spec, student_only=True)
    return SparsePlan(opts, spec, backend, LOCAL, cd, vocab)


def _run_fused(a: dict[str, Any], opts: TopKOptions):
    h, w = a["h"], a["w"]
    plan = _plan(h, a["labels"], opts, a["cd"], logits_dtype(a["cd"], h.device), w.shape[0])
    return topk_fused_forward(h, w, a["bs"], a["ids"], a["logprobs"], a["labels"], plan,
                              *a["want"])


def _run_logits(a: dict[str, Any], opts: TopKOptions):
    zs = a["zs"]
    plan = _plan(zs, a["labels"], opts, zs.dtype, zs.dtype, zs.shape[1])
    return topk_logits_forward(zs, a["ids"], a["logprobs"], a["labels"], plan,
                               a["want_grad"])


FUSED_TOPK_OP = FusedOp("fused_linear_topk_kd", "Tensor h, Tensor w, Tensor? bs, Tensor ids, "
                        "Tensor logprobs, Tensor? labels, bool[] want, ScalarType cd",
                        _run_fused, TopKOptions, topk_option_fields())
LOGITS_TOPK_OP = LogitsOp("topk_kd_loss", "Tensor zs, Tensor ids, Tensor logprobs, "
                          "Tensor? labels, bool want_grad", _run_logits, TopKOptions,
                          topk_option_fields())


def fused_topk(h, w, bs, ids, logprobs, labels, opts: TopKOptions, cd):
    return FUSED_TOPK_OP(dict(h=h, w=w, bs=bs, ids=ids, logprobs=logprobs, labels=labels,
                              cd=cd), opts)


def logits_topk(zs, ids, logprobs, labels, opts: TopKOptions, want_grad: bool):
    return LOGITS_TOPK_OP(dict(zs=zs, ids=ids, logprobs=logprobs, labels=labels,
                               want_grad=want_grad), opts)
