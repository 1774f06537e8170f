"""Prompt + completion batches for on-policy and sequence-level KD: which positions the loss
covers, the attention mask, and the positions of left-padded prompts.

A generated batch is [left pads | prompt | completion | pads after EOS]. The loss covers the
completion tokens up to and including the first EOS (the model must learn to stop); prompt
positions, pads and everything after the EOS are ignore_index. Labels are shifted the Hugging
Face way: labels[:, i] is the target of position i, the token at i + 1.
"""

from __future__ import annotations

import torch
from torch import nn

from ...hf import models
from .streams import IGNORE_INDEX


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded [B, P] batch and its attention mask: generation appends
    to the right, so every prompt must end at the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.int64)
            mask[row, width - len(p):] = 1
    return ids, mask


def assemble(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion: torch.Tensor,
             eos_id: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    """The training batch of prompts [B, P] (mask [B, P]) and their completions [B, N].

    A completion stops at its first EOS (kept: it is a target); later columns become pads
    with attention 0 and no loss. Without an EOS id every completion token is kept."""
    completion = completion.to(prompt_ids.device)
    if eos_id is None:
        keep = torch.ones_like(completion, dtype=torch.bool)
    else:
        is_eos = completion == eos_id
        # Columns strictly after the first EOS: an EOS occurred at an earlier column.
        after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        keep = ~after
    completion = completion.masked_fill(~keep, pad_id)
    ids = torch.cat([prompt_ids, completion], 1)
    mask = torch.cat([prompt_mask.to(torch.int64), keep.to(torch.int64)], 1)
    target_kept = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), keep], 1)[:, 1:]
    labels = ids[:, 1:].masked_fill(~target_kept, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only, as HF generate counts them for
    left-padded prompts (pads sit at position 0, which nothing reads)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def masked_hidden_states(model: nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states of a padded batch with the positions generation used, so the
    training forward sees each completion exactly as it was sampled. Rows of left pads
    attend to nothing real; their outputs are never read (their labels are ignored) and are
    zeroed so that no NaN of a fully masked softmax can reach the loss."""
    out = models.base_model(model)(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids(attention_mask),
                                   use_cache=False).last_hidden_state
    return out.masked_fill(attention_mask[..., None] == 0, 0.0)


def kept_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tokens a batch's loss covers: its kept labels, or every next-token target."""
    if "labels" in batch:
        return (batch["labels"] != IGNORE_INDEX).sum()
    return (batch["input_ids"][:, 1:] >= 0).sum()
