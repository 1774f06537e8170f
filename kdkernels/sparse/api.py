"""Public entry points of the sparse-teacher losses: fused_linear_topk_kd_loss, topk_kd_loss
and the FusedLinearTopKKDLoss module (docs/sparse_teachers.md)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from .. import parallel
from ..backends import registry
from ..backends.base import RowSpec
from ..engine import gemm
from ..engine.autograd import row_spec
from ..engine.calls import (
    KDComponents,
    LossModule,
    autocast_dtype,
    finish_outputs,
    input_failure,
)
from ..engine.local_reducer import LOCAL, Reducer
from ..engine.validation import (
    check_bias,
    check_head,
    check_labels,
    check_pair_dtypes,
    check_same_device,
    check_tensor,
)
from ..parallel import VocabParallel
from . import compiled
from .autograd import TopKFusedLinear, TopKLogits
from .options import TopKOptions, topk_option_fields
from .plan import SparsePlan
from .teacher import check_teacher_tensors


def _options(arguments: dict[str, Any]) -> TopKOptions:
    return TopKOptions(**{f.name: arguments[f.name] for f in topk_option_fields()})


def _spec(opts: TopKOptions, labels: torch.Tensor | None) -> RowSpec:
    """The student row ops' spec (the dense rule: with return_components, CE is computed for
    monitoring even at ce_weight = 0)."""
    return row_spec(opts.dense, labels)


def _check_fused(h, w, bs, ids, logprobs, vocab, autocast: bool):
    if h.dim() < 1:
        raise ValueError("student_hidden must be [..., D]; got a 0-d tensor")
    check_head("student_weight", w, "student_hidden", h)
    check_bias("student_bias", bs, w.shape[0])
    check_pair_dtypes("student_hidden", h, "student_weight", w, autocast)
    return check_teacher_tensors(ids, logprobs, h.shape[:-1], "student_hidden", vocab)


def _check_logits(zs, ids, logprobs, vocab):
    if zs.dim() < 1 or zs.shape[-1] < 1:
        raise ValueError(f"student_logits must be [..., V] with V >= 1; got {list(zs.shape)}")
    return check_teacher_tensors(ids, logprobs, zs.shape[:-1], "student_logits", vocab)


def _no_vp_under_compile() -> None:
    raise NotImplementedError("vocab_parallel is not supported under torch.compile; compile "
                              "the model and call the loss outside it")


def fused_linear_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    tail: str = "bucket",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    student_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: float | None = None,
    chunk_size: int | None = None,
    max_workspace_bytes: int | None = None,
    impl: str = "auto",
    return_components: bool = False,
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | KDComponents:
    """Distillation of a student LM head from the teacher's top-K (or sampled) log-probs
    ``teacher_ids`` / ``teacher_logprobs`` [..., K], without the [tokens x vocab] logits.
    See docs/sparse_teachers.md."""
    opts = _options(locals())
    return fused_linear_topk_kd(student_hidden, student_weight, teacher_ids, teacher_logprobs,
                                labels, opts, student_bias=student_bias,
                                vocab_parallel=vocab_parallel)


def fused_linear_topk_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None,
    opts: TopKOptions,
    *,
    student_bias: torch.Tensor | None = None,
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | KDComponents:
    """fused_linear_topk_kd_loss with its options as one TopKOptions (for callers that build
    the options once, as the trainer integrations do)."""
    vocab_parallel, heads = parallel.unwrap(vocab_parallel, {
        "student_weight": student_weight, "student_bias": student_bias}, 0)
    student_weight, student_bias = heads.values()
    h = check_tensor("student_hidden", student_hidden)
    w = check_tensor("student_weight", student_weight)
    device = check_same_device({"student_hidden": h, "student_weight": w, "labels": labels,
                                "student_bias": student_bias,
                                "teacher_ids": teacher_ids if isinstance(
                                    teacher_ids, torch.Tensor) else None,
                                "teacher_logprobs": teacher_logprobs if isinstance(
                                    teacher_logprobs, torch.Tensor) else None})
    autocast = autocast_dtype(device)
    check = partial(_check_fused, h, w, student_bias, teacher_ids, teacher_logprobs,
                    None if vocab_parallel is not None else w.shape[0], autocast is not None)
    reducer: Reducer = LOCAL
    if vocab_parallel is None:
        ids, logprobs = check()
        vocab = w.shape[0]
    else:  # a failed check raises on every rank together
        ok = w.dim() == 2 and w.shape[0] >= 1
        flags = tuple(None if t is None else bool(t.requires_grad)
                      for t in (h, w, student_bias))
        reducer = parallel.sparse_setup(
            vocab_parallel, "fused_topk", (tuple(h.shape), tuple(getattr(teacher_ids, "shape",
                                                                         ()))),
            w.shape[0] if ok else 0, ok, (str(h.dtype), str(w.dtype),
                                          str(getattr(teacher_logprobs, "dtype", None))),
            labels, flags, opts, device, input_failure(check))
        vocab = reducer.vocab
        ids, logprobs = check_teacher_tensors(teacher_ids, teacher_logprobs, h.shape[:-1],
                                              "student_hidden", vocab)
    flat_labels = check_labels(labels, h.shape[:-1], "student_hidden", opts.dense)
    cd = gemm.compute_dtype(autocast if autocast is not None and h.dtype != torch.float64
                            else h.dtype, device)
    h2 = h.reshape(-1, h.shape[-1])
    if torch.compiler.is_compiling():
        if vocab_parallel is not None:
            _no_vp_under_compile()
        return finish_outputs(opts, compiled.fused_topk(h2, w, student_bias, ids, logprobs,
                                                 flat_labels, opts, cd), h.shape[:-1])
    spec = _spec(opts, flat_labels)
    backend = registry.select(opts.impl, device, gemm.logits_dtype(cd, device), spec,
                              student_only=True)
    plan = SparsePlan(opts, spec, backend, reducer, cd, vocab)
    with torch.autocast(device.type, enabled=False):
        out = TopKFusedLinear.apply(h2, w, student_bias, ids, logprobs, flat_labels, plan)
    return finish_outputs(opts, out, h.shape[:-1])


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    tail: str = "bucket",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    student_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: float | None = None,
    chunk_size: int | None = None,
    max_workspace_bytes: int | None = None,
    impl: str = "auto",
    return_components: bool = False,
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | KDComponents:
    """The top-k loss on student logits already materialised ([..., V]); gradient w.r.t.
    student_logits, chunk by chunk."""
    opts = _options(locals())
    vocab_parallel, logits = parallel.unwrap(vocab_parallel, {"student_logits": student_logits},
                                             -1)
    zs = check_tensor("student_logits", logits["student_logits"])
    device = check_same_device({"student_logits": zs, "labels": labels,
                                "teacher_ids": teacher_ids if isinstance(
                                    teacher_ids, torch.Tensor) else None,
                                "teacher_logprobs": teacher_logprobs if isinstance(
                                    teacher_logprobs, torch.Tensor) else None})
    compiling = torch.compiler.is_compiling()
    if compiling and vocab_parallel is not None:
        _no_vp_under_compile()
    check = partial(_check_logits, zs, teacher_ids, teacher_logprobs,
                    None if vocab_parallel is not None else zs.shape[-1])
    reducer: Reducer = LOCAL
    if vocab_parallel is None:
        ids, logprobs = check()
        vocab = zs.shape[-1]
    else:
        ok = zs.dim() >= 1 and zs.shape[-1] >= 1
        reducer = parallel.sparse_setup(
            vocab_parallel, "logits_topk", (tuple(zs.shape[:-1]),
                                            tuple(getattr(teacher_ids, "shape", ()))),
            zs.shape[-1] if ok else 0, ok, (str(zs.dtype),
                                            str(getattr(teacher_logprobs, "dtype", None))),
            labels, (bool(zs.requires_grad),), opts, device, input_failure(check))
        vocab = reducer.vocab
        ids, logprobs = check_teacher_tensors(teacher_ids, teacher_logprobs, zs.shape[:-1],
                                              "student_logits", vocab)
    flat_labels = check_labels(labels, zs.shape[:-1], "student_logits", opts.dense)
    zs2 = zs.reshape(-1, zs.shape[-1])
    zs2 = zs2 if zs2.stride(-1) == 1 else zs2.contiguous()
    if compiling:
        want = zs.requires_grad and torch.is_grad_enabled()
        out = compiled.logits_topk(zs2, ids, logprobs, flat_labels, opts, want)
        return finish_outputs(opts, out, zs.shape[:-1])
    spec = _spec(opts, flat_labels)
    backend = registry.select(opts.impl, device, zs.dtype, spec, student_only=True)
    plan = SparsePlan(opts, spec, backend, reducer, zs.dtype, vocab)
    return finish_outputs(opts, TopKLogits.apply(zs2, ids, logprobs, flat_labels, plan),
                   zs.shape[:-1])


class FusedLinearTopKKDLoss(LossModule):
    """nn.Module form of fused_linear_topk_kd_loss; options are checked at construction."""

    options_class = TopKOptions

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                labels: torch.Tensor | None = None, *,
                student_bias: torch.Tensor | None = None) -> torch.Tensor | KDComponents:
        return fused_linear_topk_kd_loss(student_hidden, student_weight, teacher_ids,
                                         teacher_logprobs, labels, student_bias=student_bias,
                                         vocab_parallel=self.vocab_parallel, **self.options)
