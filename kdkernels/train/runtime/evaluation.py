"""Held-out evaluation: mean next-token cross-entropy over fixed windows, the same for every
model of a run, with each model's own logit transform."""

from __future__ import annotations

import torch
from torch import nn

from ...hf import models
from ...hf.logit_transform import apply_logit_transform
from ..batches.streams import IGNORE_INDEX


@torch.no_grad()
def heldout_ce(model: nn.Module, batches: list, device: torch.device,
               autocast: bool = False, chunk: int = 1024) -> float:
    """Mean next-token cross-entropy (nats/token) over fixed held-out windows. Logits are
    built a chunk of tokens at a time, never for the whole batch."""
    was_training = model.training
    model.eval()
    weight, bias = models.head(model)
    scale, cap = models.logit_transform(model)
    total, count = 0.0, 0
    for batch in batches:
        # a tensor of windows, or (windows, labels) where prompt tokens are ignore_index
        ids, y = batch if isinstance(batch, tuple) else (batch, batch[:, 1:])
        ids, y = ids.to(device), y.reshape(-1).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            h = models.hidden_states(model, ids)[:, :-1].reshape(-1, weight.shape[1])
        for hc, yc in zip(h.split(chunk), y.split(chunk), strict=True):
            z = nn.functional.linear(hc.float(), weight.float(),
                                     None if bias is None else bias.float())
            z = apply_logit_transform(z, scale, cap)
            total += float(nn.functional.cross_entropy(
                z, yc, reduction="sum", ignore_index=IGNORE_INDEX))
            count += int((yc != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / count
