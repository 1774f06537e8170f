"""The objectives of a run, built from its TrainConfig: the loss options are read once
(TrainConfig.loss_options: every KDOptions field the trainer carries) and passed on whole,
so an option added to KDOptions reaches both objectives with no edit here."""

from __future__ import annotations

from torch import nn

from ...hf import models
from ..config import TrainConfig
from .dense import DistillObjective
from .topk import TopKObjective, check_options

# Objective kinds of a training stage: the fused dense loss, its materialised-logits
# yardstick (--baseline naive), and the top-k loss on cached teacher log-probs.
FUSED, NAIVE, TOPK = "fused", "naive", "topk"


def distill_objective(cfg: TrainConfig, student: nn.Module, teacher: nn.Module | None,
                      baseline: str = FUSED) -> DistillObjective:
    """The dense objective; the teacher's logit transform is read from the teacher (None:
    a model trained on hard labels, e.g. the embedded teacher or the CE student)."""
    scale, softcap = (1.0, None) if teacher is None else models.logit_transform(teacher)
    return DistillObjective(student, baseline=baseline, teacher_softcap=softcap,
                            teacher_logit_scale=scale, **cfg.loss_options())


def topk_objective(cfg: TrainConfig, student: nn.Module) -> TopKObjective:
    return TopKObjective(student, tail=cfg.tail, **cfg.loss_options())


def for_stage(cfg: TrainConfig, kind: str, student: nn.Module,
              teacher: nn.Module | None) -> nn.Module:
    """The objective of a stage of kind FUSED, NAIVE or TOPK."""
    if kind == TOPK:
        return topk_objective(cfg, student)
    return distill_objective(cfg, student, teacher, kind)


def topk_refusal(cfg: TrainConfig) -> str | None:
    """Why the top-k loss cannot run this configuration (e.g. JSD under --tail zero)."""
    try:
        check_options(tail=cfg.tail, **cfg.loss_options())
    except ValueError as err:
        return str(err)
    return None
