"""Public entry points: fused_linear_kd_loss, kd_loss and the FusedLinearKDLoss module."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from .. import parallel
from ..backends import registry
from ..engine import gemm
from ..engine.autograd import row_spec as _spec
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
from ..options import KDOptions, option_fields
from ..parallel import VocabParallel
from . import compiled
from .autograd import FusedLinearKD, LogitsKD
from .plan import Plan


def _options(arguments: dict[str, Any]) -> KDOptions:
    """KDOptions from a public function's arguments (its ``locals()`` on entry): the
    signatures are the one place besides KDOptions that spell the options out."""
    return KDOptions(**{f.name: arguments[f.name] for f in option_fields()})


def _check_fused_inputs(h, w, g, u, bs, bt, autocast: bool) -> None:
    if h.dim() < 1 or g.dim() < 1:
        raise ValueError("student_hidden and teacher_hidden must be [..., D]; got a 0-d tensor")
    if h.shape[:-1] != g.shape[:-1]:
        raise ValueError(f"teacher_hidden must have the leading shape of student_hidden, "
                         f"{list(h.shape[:-1])}; got {list(g.shape[:-1])}")
    check_head("student_weight", w, "student_hidden", h)
    check_head("teacher_weight", u, "teacher_hidden", g)
    check_bias("student_bias", bs, w.shape[0])
    check_bias("teacher_bias", bt, u.shape[0])
    check_pair_dtypes("student_hidden", h, "student_weight", w, autocast)
    check_pair_dtypes("teacher_hidden", g, "teacher_weight", u, autocast)


def _check_logits_inputs(zs, zt) -> None:
    if zs.dim() < 1 or zt.dim() < 1 or zs.shape[-1] < 1 or zt.shape[-1] < 1:
        raise ValueError(f"student_logits and teacher_logits must be [..., V] with V >= 1; "
                         f"got {list(zs.shape)} and {list(zt.shape)}")
    if zs.shape[:-1] != zt.shape[:-1]:
        raise ValueError(f"teacher_logits must have the leading shape of student_logits, "
                         f"{list(zs.shape[:-1])}; got {list(zt.shape[:-1])}")


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: float | None = None,
    chunk_size: int | None = None,
    max_workspace_bytes: int | None = None,
    impl: str = "auto",
    return_components: bool = False,
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | KDComponents:
    """Distillation loss of a student LM head against a teacher's, without materialising
    the [tokens x vocab] logits. See docs/api.md for every option."""
    opts = _options(locals())
    return fused_linear_kd(student_hidden, student_weight, teacher_hidden, teacher_weight,
                           labels, opts, student_bias=student_bias, teacher_bias=teacher_bias,
                           vocab_parallel=vocab_parallel)


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None,
    opts: KDOptions,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | KDComponents:
    """fused_linear_kd_loss with its options as one KDOptions (for callers that build the
    options once, as the trainer integrations do)."""
    vocab_parallel, heads = parallel.unwrap(vocab_parallel, {
        "student_weight": student_weight, "teacher_weight": teacher_weight,
        "student_bias": student_bias, "teacher_bias": teacher_bias}, 0)
    student_weight, teacher_weight, student_bias, teacher_bias = heads.values()
    h = check_tensor("student_hidden", student_hidden)
    w = check_tensor("student_weight", student_weight)
    g = check_tensor("teacher_hidden", teacher_hidden)
    u = check_tensor("teacher_weight", teacher_weight)
    device = check_same_device({"student_hidden": h, "student_weight": w, "teacher_hidden": g,
                                "teacher_weight": u, "labels": labels,
                                "student_bias": student_bias, "teacher_bias": teacher_bias})
    autocast = autocast_dtype(device)

    check_inputs = partial(_check_fused_inputs, h, w, g, u, student_bias, teacher_bias,
                           autocast is not None)
    reducer: Reducer = LOCAL
    if vocab_parallel is None:
        check_inputs()
    else:  # a failed check raises on every rank together, never on one rank alone
        reducer = parallel.fused_setup(vocab_parallel, h, w, g, u, labels, student_bias,
                                       teacher_bias, opts, device, input_failure(check_inputs))
    vocab = min(w.shape[0], u.shape[0]) if vocab_parallel is None else reducer.vocab
    compiling = torch.compiler.is_compiling()
    # The label range is checked inside the loss, with the kept-row scan (one host sync).
    flat_labels = check_labels(labels, h.shape[:-1], "student_hidden", opts)
    cd_s = gemm.compute_dtype(autocast if autocast is not None and h.dtype != torch.float64
                              else h.dtype, device)
    cd_t = gemm.compute_dtype(autocast if autocast is not None and g.dtype != torch.float64
                              else g.dtype, device)
    h2, g2 = h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1])
    if compiling:
        if vocab_parallel is not None:
            raise NotImplementedError("vocab_parallel is not supported under torch.compile; "
                                      "compile the model and call the loss outside it")
        return finish_outputs(opts, compiled.fused(h2, w, student_bias, g2, u, teacher_bias,
                                            flat_labels, opts, cd_s, cd_t), h.shape[:-1])
    spec = _spec(opts, flat_labels)
    backend = registry.select(opts.impl, device, gemm.logits_dtype(cd_s, device), spec)
    plan = Plan(opts, spec, backend, reducer, cd_s, cd_t, vocab)
    with torch.autocast(device.type, enabled=False):
        out = FusedLinearKD.apply(h2, w, student_bias, g2, u, teacher_bias, flat_labels, plan)
    return finish_outputs(opts, out, h.shape[:-1])


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: float | None = None,
    chunk_size: int | None = None,
    max_workspace_bytes: int | None = None,
    impl: str = "auto",
    return_components: bool = False,
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | KDComponents:
    """The same loss on logits already materialised ([..., Vs] and [..., Vt]); gradient
    w.r.t. student_logits, computed chunk by chunk without fp32 copies of either tensor."""
    opts = _options(locals())
    vocab_parallel, logits = parallel.unwrap(vocab_parallel, {
        "student_logits": student_logits, "teacher_logits": teacher_logits}, -1)
    student_logits, teacher_logits = logits.values()
    zs = check_tensor("student_logits", student_logits)
    zt = check_tensor("teacher_logits", teacher_logits)
    device = check_same_device({"student_logits": zs, "teacher_logits": zt, "labels": labels})

    check_inputs = partial(_check_logits_inputs, zs, zt)
    compiling = torch.compiler.is_compiling()
    if compiling and vocab_parallel is not None:
        raise NotImplementedError("vocab_parallel is not supported under torch.compile; "
                                  "compile the model and call the loss outside it")
    reducer: Reducer = LOCAL
    if vocab_parallel is None:
        check_inputs()
    else:
        reducer = parallel.logits_setup(vocab_parallel, zs, zt, labels, opts, device,
                                        input_failure(check_inputs))
    vocab = min(zs.shape[-1], zt.shape[-1]) if vocab_parallel is None else reducer.vocab
    # The label range is checked inside the loss, with the kept-row scan (one host sync).
    flat_labels = check_labels(labels, zs.shape[:-1], "student_logits", opts)
    # Row-major views; a copy happens only for inputs whose last dim is not contiguous.
    zs2 = zs.reshape(-1, zs.shape[-1])
    zt2 = zt.reshape(-1, zt.shape[-1])
    zs2 = zs2 if zs2.stride(-1) == 1 else zs2.contiguous()
    zt2 = zt2 if zt2.stride(-1) == 1 else zt2.contiguous()
    if compiling:
        want = zs.requires_grad and torch.is_grad_enabled()
        out = compiled.logits(zs2, zt2, flat_labels, opts, want)
        return finish_outputs(opts, out, zs.shape[:-1])
    spec = _spec(opts, flat_labels)
    backend = registry.select(opts.impl, device, zs.dtype, spec)
    plan = Plan(opts, spec, backend, reducer, zs.dtype, zt.dtype, vocab)
    return finish_outputs(opts, LogitsKD.apply(zs2, zt2, flat_labels, plan), zs.shape[:-1])


class FusedLinearKDLoss(LossModule):
    """nn.Module form of fused_linear_kd_loss; options are checked at construction."""

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                labels: torch.Tensor | None = None, *, student_bias: torch.Tensor | None = None,
                teacher_bias: torch.Tensor | None = None) -> torch.Tensor | KDComponents:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden,
                                    teacher_weight, labels, student_bias=student_bias,
                                    teacher_bias=teacher_bias,
                                    vocab_parallel=self.vocab_parallel, **self.options)
