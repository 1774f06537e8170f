"""The cross-tokenizer objective: ULD or GOLD's hybrid (``kdkernels.fused_linear_uld_loss``)
from the student's and the teacher's final hidden states and LM heads, plus the student's
hard-label CE, on batches of batches/text_windows.py (both tokenizations of one text).

Per step: ``kd_weight * ULD + ce_weight * CE`` where ULD is the loss's per-sample mean over
the step's windows (``reduction="sum"`` divided by batch_size x grad_accum, so micro-batches
add up to the mean of one big batch, and DDP's average over ranks to the global mean) and CE
the mean next-token CE over the step's labelled tokens (``num_items``), fused
(``fused_linear_kd_loss`` with kd_weight 0). With one micro-batch on one rank this is exactly
``uld_loss(..., distillation_weight=kd_weight, ce_weight=ce_weight)`` on the two models'
logits. The EOS skips are off: a window's tokens are all text (and an EOS only where its
document really ends, on both sides, so the two EOS pair up as a group of their own).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...dense.api import KDComponents, fused_linear_kd_loss
from ...hf import models
from ...uld.fused import fused_linear_uld_loss

ULD, HYBRID = "uld", "hybrid"
MODES = (ULD, HYBRID)
# What the objective reads from a batch besides input_ids and labels (text_windows.py).
BATCH_KEYS = ("student_labels", "student_offsets", "teacher_input_ids", "teacher_labels",
              "teacher_offsets")


def _transform(model: nn.Module, who: str) -> float:
    scale, softcap = models.logit_transform(model)
    if softcap is not None:
        raise ValueError(f"the {who} caps its logits (final_logit_softcapping={softcap}); the "
                         "cross-tokenizer loss (ULD / hybrid) has no softcap, so it would "
                         "distil other logits than the model's")
    return float(scale)


class CrossTokenizerObjective(nn.Module):
    """forward(input_ids, targets, teacher_weight, num_items, labels) -> KDComponents (kd:
    the ULD / hybrid term before kd_weight, ce: the token-mean CE)."""

    def __init__(self, student: nn.Module, *, mode: str, vocab_map: torch.Tensor | None,
                 merge: str, beta: float, temperature: float, kd_weight: float,
                 ce_weight: float, samples_per_step: int, impl: str = "auto",
                 teacher_logit_scale: float = 1.0) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"--cross-tokenizer must be one of {', '.join(MODES)}; got "
                             f"{mode!r}")
        if mode == HYBRID and vocab_map is None:
            raise ValueError("--cross-tokenizer hybrid needs the vocabulary map")
        self.student = student
        self.mode = mode
        self.vocab_map = vocab_map if mode == HYBRID else None
        self.student_scale = _transform(student, "student")
        self.teacher_scale = teacher_logit_scale
        self.options = dict(merge=merge, beta=beta, student_temperature=temperature,
                            teacher_temperature=temperature, skip_student_eos=False,
                            skip_teacher_eos=False, distillation_weight=kd_weight,
                            ce_weight=0.0, reduction="sum", impl=impl)
        self.kd_weight, self.ce_weight = kd_weight, ce_weight
        self.samples_per_step = samples_per_step
        self.impl = impl

    @classmethod
    def for_teacher(cls, student: nn.Module, teacher: nn.Module, **kw: Any):
        return cls(student, teacher_logit_scale=_transform(teacher, "teacher"), **kw)

    def targets(self, teacher: nn.Module, batch: dict[str, torch.Tensor]):
        """(the teacher's hidden states and the batch's alignment tensors, its head weight)."""
        if teacher is None:
            raise ValueError("the cross-tokenizer objective needs a teacher")
        hidden, weight, bias = teacher_outputs(teacher, batch["teacher_input_ids"])
        if self.teacher_scale != 1.0:  # the same logits: (s h) W^T + s b
            hidden = hidden * self.teacher_scale
            bias = None if bias is None else bias * self.teacher_scale
        return {"hidden": hidden, "bias": bias, **{k: batch[k] for k in BATCH_KEYS}}, weight

    def forward(self, input_ids: torch.Tensor, targets: dict[str, Any],
                teacher_weight: torch.Tensor, num_items: float,
                labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> KDComponents:
        hidden = models.hidden_states(self.student, input_ids)
        weight, bias = models.head(self.student)
        if self.student_scale != 1.0:
            hidden = hidden * self.student_scale
            bias = None if bias is None else bias * self.student_scale
        vmap = None if self.vocab_map is None else self.vocab_map.to(hidden.device)
        uld = fused_linear_uld_loss(
            hidden, weight, targets["hidden"], teacher_weight, targets["student_labels"],
            targets["teacher_labels"], input_ids, targets["teacher_input_ids"],
            targets["student_offsets"], targets["teacher_offsets"], student_bias=bias,
            teacher_bias=targets["bias"], vocab_map=vmap, **self.options)
        uld = uld / self.samples_per_step
        kd = uld.detach() / self.kd_weight if self.kd_weight > 0 else uld.detach()
        labels = input_ids[:, 1:] if labels is None else labels
        if self.ce_weight > 0:
            h = hidden[:, :-1]
            ce = fused_linear_kd_loss(h, weight, h.detach(), weight.detach(), labels,
                                      student_bias=bias, kd_weight=0.0, ce_weight=1.0,
                                      num_items=num_items, reduction="mean", impl=self.impl,
                                      return_components=True)
            loss = uld + self.ce_weight * ce.loss
            return KDComponents(loss, kd, ce.ce, ce.n_tokens)
        kept = (labels != -100).sum()
        return KDComponents(uld, kd, torch.zeros((), device=uld.device), kept)


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, input_ids: torch.Tensor):
    """The teacher's final hidden states (all positions: the ULD loss takes unshifted rows),
    head weight and bias, in eval mode."""
    teacher.eval()
    weight, bias = models.head(teacher)
    return models.hidden_states(teacher, input_ids), weight, bias


def from_config(cfg, student: nn.Module, teacher: nn.Module, mode: str,
                vocab_map: torch.Tensor | None) -> CrossTokenizerObjective:
    """The objective of a run's TrainConfig (a TrainConfig: --merge, --beta, --temperature
    for both sides, --kd-weight, --ce-weight, --impl)."""
    uld_impl = cfg.impl if cfg.impl in ("auto", "torch", "cpp") else "auto"
    return CrossTokenizerObjective.for_teacher(
        student, teacher, mode=mode, vocab_map=vocab_map, merge=cfg.merge or "observed",
        beta=cfg.beta, temperature=cfg.temperature, kd_weight=cfg.kd_weight,
        ce_weight=cfg.ce_weight, samples_per_step=cfg.batch_size * cfg.grad_accum,
        impl=uld_impl)
