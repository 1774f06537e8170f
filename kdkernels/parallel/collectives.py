"""The all-gather shared by the layout agreement and the reducer."""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.14 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """[size, *t.shape]: every rank's t, in rank order."""
    # Flat buffers: gloo wants the output to be the inputs concatenated along dim 0.
    out = torch.empty(size * t.numel(), dtype=t.dtype, device=t.device)
    _GATHER(out, t.contiguous().view(-1), group=group)
    return out.view(size, *t.shape)
