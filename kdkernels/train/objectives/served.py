"""The dense objective of a student distilled from a served teacher's hidden states
(`kdk distill --teacher-url --teacher-mode hidden`): each batch carries the teacher's final
hidden states (the server's /v1/hidden), the teacher's LM head was fetched once (/v1/head),
and the fused dense loss runs unchanged: the same full-vocabulary KD as with the teacher in
this process."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TrainConfig
from .dense import DistillObjective


class ServedHiddenObjective(DistillObjective):
    """DistillObjective whose teacher outputs come with the batch ("teacher_hidden"
    [B, L, Dt]) and whose teacher head is held here.

    A head bias is folded into the weight as one more column, against a column of ones
    appended to the hidden states: [h, 1] . [w, b] = h . w + b, so the loss needs no bias
    argument. The head stays a plain attribute, not a buffer, so that DDP does not broadcast
    it every step; it moves to the batch's device once.
    """

    def __init__(self, student: nn.Module, head: tuple[torch.Tensor, torch.Tensor | None],
                 **options) -> None:
        super().__init__(student, **options)
        weight, bias = head
        weight = weight.detach()
        if bias is not None:
            weight = torch.cat([weight, bias.detach().to(weight.dtype)[:, None]], dim=1)
        self._weight = weight
        self._bias = bias is not None

    def targets(self, teacher: nn.Module | None, batch: dict[str, torch.Tensor]):
        """(the batch's teacher hidden states shifted like the student's, the head)."""
        hidden = batch["teacher_hidden"][:, :-1]
        if self._weight.device != hidden.device:
            self._weight = self._weight.to(hidden.device)
        if self._bias:
            hidden = torch.cat([hidden, hidden.new_ones(*hidden.shape[:-1], 1)], dim=-1)
        return hidden, self._weight


def hidden_objective(cfg: TrainConfig, student: nn.Module,
                     head: tuple[torch.Tensor, torch.Tensor | None],
                     logit_transform: tuple[float, float | None]) -> ServedHiddenObjective:
    """The objective with the run's loss options and the served teacher's logit transform
    (its logit scale and final softcap, as the server reports them)."""
    scale, softcap = logit_transform
    return ServedHiddenObjective(student, head, teacher_softcap=softcap,
                                 teacher_logit_scale=scale, **cfg.loss_options())
