"""The training objective as a module, so DDP/FSDP see every parameter used in forward:
student hidden states + the student head go through fused_linear_kd_loss with the
teacher's hidden states and head; labels are the inputs shifted the Hugging Face way."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ... import reference
from ...dense.api import KDComponents, fused_linear_kd_loss
from ...hf import models
from ...options import KDOptions
from ..batches import completions

# Half KD, half hard-label CE unless told (the loss alone defaults to KD only).
DEFAULT_WEIGHTS = {"kd_weight": 0.5, "ce_weight": 0.5}


class DistillObjective(nn.Module):
    """forward(input_ids, teacher_hidden, teacher_weight, num_items) -> KDComponents.

    teacher_hidden=None trains on hard labels only (the CE student): the same fused path
    with kd_weight 0, the student's own detached head standing in for the teacher's.
    baseline="naive" materialises both [tokens, V] logits and uses the plain loss.
    """

    def __init__(self, student: nn.Module, *, baseline: str = "fused", **options: Any) -> None:
        """options: any KDOptions field (divergence, beta, temperature, kd_weight, impl,
        teacher_softcap, ...), passed to the loss as given; the student's logit transform
        is read from the student. Checked here, before any step."""
        super().__init__()
        if baseline not in ("fused", "naive"):
            raise ValueError(f"--baseline must be 'fused' or 'naive'; got {baseline!r}")
        self.student = student
        self.baseline = baseline
        scale, softcap = models.logit_transform(student)
        self.options = {**DEFAULT_WEIGHTS, **options, "student_softcap": softcap,
                        "student_logit_scale": scale}
        KDOptions(**self.options)

    @staticmethod
    def targets(teacher: nn.Module | None, batch: dict[str, torch.Tensor]):
        """What forward takes after input_ids: the teacher's hidden states and head, or
        (None, None) for the CE student (cached teacher tensors in a batch are unused)."""
        if teacher is None:
            return None, None
        return teacher_outputs(teacher, batch["input_ids"], batch.get("attention_mask"))

    def forward(self, input_ids: torch.Tensor, teacher_hidden: torch.Tensor | None,
                teacher_weight: torch.Tensor | None, num_items: float,
                labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> KDComponents:
        """labels [B, L - 1]: the shifted inputs unless given (prompt/completion data and
        generated batches pass ignore_index outside the completion; the loss skips those
        rows); attention_mask: a generated batch's left padding."""
        hidden = _hidden(self.student, input_ids, attention_mask)[:, :-1]
        labels = input_ids[:, 1:] if labels is None else labels
        weight, bias = models.head(self.student)
        opts = dict(self.options, num_items=num_items, reduction="mean")
        if teacher_hidden is None:  # CE only: the KD term is weighted 0 and never trained
            teacher_hidden, teacher_weight = hidden.detach(), weight.detach()
            opts.update(kd_weight=0.0, ce_weight=1.0, teacher_softcap=opts["student_softcap"],
                        teacher_logit_scale=opts["student_logit_scale"])
        if self.baseline == "naive":
            return _naive(hidden, weight, bias, teacher_hidden, teacher_weight, labels, opts)
        return fused_linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels,
                                    student_bias=bias, return_components=True, **opts)


def _naive(hidden, weight, bias, teacher_hidden, teacher_weight, labels, opts) -> KDComponents:
    """The plain materialised-logits loss (the --baseline naive yardstick), fp32 math."""
    zs = nn.functional.linear(hidden, weight, bias)
    zt = nn.functional.linear(teacher_hidden, teacher_weight)
    out = reference.reference_kd_loss(zs, zt, labels, compute_dtype=torch.float32, **opts)
    norm = opts["num_items"]
    return KDComponents(out["loss"], out["kd_rows"].detach().sum() / norm,
                        out["ce_rows"].detach().sum() / norm,
                        torch.tensor(out["kept"], dtype=torch.int64))


def _hidden(model: nn.Module, input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return models.hidden_states(model, input_ids)
    return completions.masked_hidden_states(model, input_ids, attention_mask)


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None):
    """Teacher hidden states (shifted like the student's) and head, in eval mode."""
    teacher.eval()
    return _hidden(teacher, input_ids, attention_mask)[:, :-1], models.head(teacher)[0]
