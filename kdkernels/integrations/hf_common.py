"""What the Hugging Face Trainer integrations (hf.py, hf_topk.py) share."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer

from ..hf import models


def student_hidden(trainer: Trainer, model: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The student's final hidden states [B, L, D], never its full logits."""
    unwrapped = trainer.accelerator.unwrap_model(model)
    if model is unwrapped:
        return models.base_model(unwrapped)(input_ids=input_ids,
                                            attention_mask=attention_mask,
                                            use_cache=False).last_hidden_state
    # Wrapped (DDP/FSDP): go through the wrapper so its gradient hooks run; the final
    # hidden state comes back in hidden_states, and logits are built for 1 position only.
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def scaled_for_devices(trainer: Trainer, loss: torch.Tensor, num: float | None) -> torch.Tensor:
    """With num_items_in_batch counted over every process the loss is normalised by the
    tokens of all of them; DDP averages gradients over processes, so scale back up."""
    if trainer.args.average_tokens_across_devices and num is not None:
        return loss * trainer.accelerator.num_processes
    return loss
