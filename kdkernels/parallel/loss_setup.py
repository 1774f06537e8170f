"""Per-loss setup of a vocab-parallel call: what every rank must agree on (the options,
shapes, dtypes and grad flags), the agreed layout, and the call's group reducer."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..options import KDOptions
from .group_reducer import VocabParallelReducer
from .shard_layout import BAD_SHARD, INPUT_ERROR, OK, checksum, layout_for
from .vocab_parallel import VocabParallel


def settings_key(opts: KDOptions, *parts: Any) -> tuple:
    """What every rank must agree on: all options plus shapes, dtypes and grad flags."""
    return (opts.values(), torch.is_grad_enabled(), *parts)


def setup(vp: VocabParallel, width_s: int, width_t: int, device: torch.device,
          settings: tuple, shard_ok: bool = True,
          local_error: Exception | None = None) -> VocabParallelReducer:
    """Layout (one all-gather, checked on every rank) and the call's reducer. ``local_error``:
    this rank's failed input check, raised here on every rank together."""
    # An empty or malformed shard gets the shard message on every rank (clearer than the
    # local check's, which it also trips).
    status = BAD_SHARD if not shard_ok else (OK if local_error is None else INPUT_ERROR)
    layout = layout_for(vp, width_s, width_t, device, settings, status, local_error)
    group = vp.group if vp.group is not None else dist.group.WORLD
    return VocabParallelReducer(group, layout, checksum(settings), device)


def grad_flags(*ts: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else bool(t.requires_grad) for t in ts)


def fused_setup(vp: VocabParallel, h: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                u: torch.Tensor, labels: torch.Tensor | None, bs: torch.Tensor | None,
                bt: torch.Tensor | None, opts: KDOptions, device: torch.device,
                local_error: Exception | None = None) -> VocabParallelReducer:
    """Reducer for fused_linear_kd_loss on head shards w [Vs_local, Ds], u [Vt_local, Dt]."""
    ok = w.dim() == 2 and u.dim() == 2 and w.shape[0] >= 1 and u.shape[0] >= 1
    settings = settings_key(opts, "fused", tuple(h.shape), tuple(g.shape), str(h.dtype),
                            str(w.dtype), str(g.dtype), str(u.dtype), labels is None,
                            grad_flags(h, w, bs, g, u, bt), str(autocast_dtype(device)))
    return setup(vp, w.shape[0] if ok else 0, u.shape[0] if ok else 0, device, settings, ok,
                 local_error)


def logits_setup(vp: VocabParallel, zs: torch.Tensor, zt: torch.Tensor,
                 labels: torch.Tensor | None, opts: KDOptions, device: torch.device,
                 local_error: Exception | None = None) -> VocabParallelReducer:
    """Reducer for kd_loss on logit shards zs [..., Vs_local], zt [..., Vt_local]."""
    ok = zs.dim() >= 1 and zt.dim() >= 1 and zs.shape[-1] >= 1 and zt.shape[-1] >= 1
    settings = settings_key(opts, "logits", tuple(zs.shape[:-1]), tuple(zt.shape[:-1]),
                            str(zs.dtype), str(zt.dtype), labels is None, grad_flags(zs, zt))
    return setup(vp, zs.shape[-1] if ok else 0, zt.shape[-1] if ok else 0, device, settings, ok,
                 local_error)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
        else None


def sparse_setup(vp: VocabParallel, what: str, lead: tuple, width: int, ok: bool,
                 dtypes: tuple, labels: torch.Tensor | None, grad_flags: tuple, opts,
                 device: torch.device, local_error: Exception | None = None
                 ) -> VocabParallelReducer:
    """Reducer for the sparse-teacher losses on a student shard of ``width`` vocabulary rows
    (head rows or logit columns); teacher ids are global, so only the student is sharded."""
    settings = settings_key(opts, what, lead, *dtypes, labels is None, grad_flags,
                            str(autocast_dtype(device)))
    return setup(vp, width if ok else 0, width if ok else 0, device, settings, ok, local_error)
