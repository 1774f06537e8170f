"""The objective of a student trained from cached teacher top-K log-probs: student hidden
states + head through fused_linear_topk_kd_loss. Position t of a cached sequence holds the
teacher's distribution of the token after input_ids[t], so it pairs with the label
input_ids[t + 1]; the last position has no label and is dropped, as in DistillObjective.
A cache with positions that hold no target (generated sequences: prompt and padding) comes with
labels that ignore them (batches/cache_data.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ...dense.api import KDComponents
from ...hf import models
from ...sparse.api import fused_linear_topk_kd_loss
from ...sparse.options import TopKOptions
from .dense import DEFAULT_WEIGHTS


def check_options(**options: Any) -> None:
    """Refuse options the top-k loss cannot take (e.g. --divergence jsd under --tail zero:
    no top-k form, or an option it does not have) before any model work, naming the tail's
    rule."""
    tail = options.get("tail", "bucket")
    unknown = set(options) - {f.name for f in dataclasses.fields(TopKOptions)}
    if unknown:
        raise ValueError(f"a top-k student (--tail {tail}): the top-k loss takes no "
                         f"{', '.join(sorted(unknown))} option")
    try:
        TopKOptions(**options)
    except ValueError as err:
        raise ValueError(f"a top-k student (--tail {tail}): {err}") from None


class TopKObjective(nn.Module):
    """forward(input_ids, teacher_ids, teacher_logprobs, num_items) -> KDComponents."""

    def __init__(self, student: nn.Module, **options: Any) -> None:
        """options: any TopKOptions field (tail, divergence, beta, kd_weight, impl, ...),
        passed to the loss as given; the student's logit transform is read from the
        student. Checked here, before any step."""
        super().__init__()
        self.student = student
        scale, softcap = models.logit_transform(student)
        self.options = {**DEFAULT_WEIGHTS, **options, "student_softcap": softcap,
                        "student_logit_scale": scale}
        check_options(**self.options)

    @staticmethod
    def targets(teacher: nn.Module | None, batch: dict[str, torch.Tensor]):
        """The cached teacher tensors of a batch (there is no teacher model)."""
        return batch["teacher_ids"], batch["teacher_logprobs"]

    def forward(self, input_ids: torch.Tensor, teacher_ids: torch.Tensor,
                teacher_logprobs: torch.Tensor, num_items: float,
                labels: torch.Tensor | None = None) -> KDComponents:
        """labels [B, L - 1]: the shifted inputs unless given (ignore_index where a cached
        position has no target)."""
        hidden = models.hidden_states(self.student, input_ids)[:, :-1]
        weight, bias = models.head(self.student)
        labels = input_ids[:, 1:] if labels is None else labels
        return fused_linear_topk_kd_loss(
            hidden, weight, teacher_ids[:, :-1], teacher_logprobs[:, :-1], labels,
            student_bias=bias, return_components=True, reduction="mean", num_items=num_items,
            **self.options)
