"""What the Hugging Face Trainer integrations (hf.py, hf_topk.py) share."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..hf import engine_heads, models
from ..options import option_fields

# The options a trainer sets itself: a mean over the Trainer's num_items_in_batch of labels
# masked with -100 (as its collators pad them), the components for its logs, and each
# model's logit scale and softcap from its config (logit_transform).
TRAINER_OPTIONS = ("ignore_index", "reduction", "num_items", "return_components",
                   "student_logit_scale", "teacher_logit_scale", "student_softcap",
                   "teacher_softcap")


def pop_loss_options(options_class: type, kwargs: dict[str, Any], trainer: str) -> Any:
    """The loss options among a trainer's keyword arguments, taken out of ``kwargs`` (the
    rest are transformers.Trainer's) and checked once as ``options_class``, with the fixed
    ones of TRAINER_OPTIONS set (num_items and the logit transforms come per batch)."""
    names = [f.name for f in option_fields(options_class)]
    fixed = [name for name in names if name in TRAINER_OPTIONS and name in kwargs]
    if fixed:
        raise TypeError(f"{trainer} sets {', '.join(fixed)} itself (a mean over "
                        f"num_items_in_batch with labels -100; each model's logit scale and "
                        f"softcap from its config)")
    options = {name: kwargs.pop(name) for name in names if name in kwargs}
    return options_class(**options, reduction="mean", return_components=True)


def student_hidden(model: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The student's final hidden states [B, L, D], never its full logits; called inside the
    wrapped model's forward (engine_heads.run_in_forward), so the engine's hooks run."""
    return models.base_model(model)(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state


def zero3_enabled(trainer: Trainer) -> bool:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)


def shard_teacher(trainer: Trainer, teacher: nn.Module) -> nn.Module | None:
    """Under ZeRO-3 the teacher is partitioned like the student, by a ZeRO-3 inference engine
    (returned; its forward gathers the teacher); None for the other engines, which replicate it."""
    if not zero3_enabled(trainer):
        return None
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    return engine_heads.zero3_inference(teacher, config)


def scaled_for_devices(trainer: Trainer, loss: torch.Tensor, num: float | None) -> torch.Tensor:
    """With num_items_in_batch counted over every process the loss is normalised by the
    tokens of all of them; DDP averages gradients over processes, so scale back up."""
    if trainer.args.average_tokens_across_devices and num is not None:
        return loss * trainer.accelerator.num_processes
    return loss
