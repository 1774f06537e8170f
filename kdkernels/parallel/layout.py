"""Shard layout and agreement: every call of a vocab-parallel loss first agrees, in one
all-gather of 5 int64 per rank, on each rank's shard, a checksum of the call's settings and
whether each rank's own input checks passed; an input that fails on one rank raises on every
rank together, instead of leaving the others waiting in the first chunk's collective."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..options import KDOptions
from .collectives import all_gather
from .reducer import VocabParallelReducer, check_tiling
from .vocab_parallel import VocabParallel


@dataclass(frozen=True)
class Layout:
    """Every rank's shard, indexed by rank in the group."""

    starts: tuple[int, ...]
    widths: tuple[int, ...]
    rank: int

    @property
    def vocab(self) -> int:
        return sum(self.widths)

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def max_width(self) -> int:
        return max(self.widths)


# Status column of the layout all-gather.
_OK, _BAD_SHARD, _INPUT_ERROR = 1, 0, 2


def _checksum(parts: tuple) -> int:
    # Python's hash() of strings differs between processes; crc32 of the repr does not.
    return zlib.crc32(repr(parts).encode())


def _check_layout(table: list[list[int]], size: int,
                  local_error: Exception | None = None) -> tuple[list[int], list[int]]:
    """Starts and widths from the gathered rows (given start or -1, ws, wt, crc, status);
    raises the same error on every rank (every rank sees the same table), the failing
    rank's own message on the ranks whose input checks failed."""
    failed = [r for r, row in enumerate(table) if row[4] == _INPUT_ERROR]
    if failed:
        what = f"vocab_parallel: rank(s) {failed} rejected their inputs"
        if local_error is not None:
            raise type(local_error)(f"{what}; here: {local_error}") from local_error
        raise ValueError(f"{what} (the error raised there says why); no rank computed the "
                         f"loss")
    bad = [r for r, row in enumerate(table) if row[4] == _BAD_SHARD or row[1] < 1]
    if bad:
        raise ValueError(f"vocab_parallel: the heads (or logits) of rank(s) {bad} are not "
                         f"non-empty [V_shard, D] shards ([..., V_shard] logits); every rank "
                         f"must hold at least one vocabulary row")
    diff = [(r, row[1], row[2]) for r, row in enumerate(table) if row[1] != row[2]]
    if diff:
        shown = ", ".join(f"rank {r}: {ws} student rows vs {wt} teacher rows"
                          for r, ws, wt in diff)
        raise ValueError(f"vocab_parallel: student and teacher shards must cover the same "
                         f"vocabulary rows on every rank; {shown}")
    crcs = sorted({row[3] for row in table})
    if len(crcs) > 1:
        groups = {c: [r for r, row in enumerate(table) if row[3] == c] for c in crcs}
        raise ValueError(f"vocab_parallel: loss options, chunk settings, dtypes or input "
                         f"shapes differ across ranks (ranks grouped by settings: "
                         f"{sorted(groups.values())}); every rank must call the loss with "
                         f"the same options and replicated hidden states and labels")
    given = [row[0] >= 0 for row in table]
    widths = [row[1] for row in table]
    if any(given) and not all(given):
        raise ValueError(f"vocab_parallel: vocab_start must be given on every rank or on none; "
                         f"ranks {[r for r in range(size) if not given[r]]} passed None")
    if not any(given):
        starts = [sum(widths[:r]) for r in range(size)]
    else:
        starts = [row[0] for row in table]
    check_tiling(starts, widths)
    return starts, widths


def layout_for(vp: VocabParallel, width_s: int, width_t: int, device: torch.device,
               settings: tuple, status: int = _OK,
               local_error: Exception | None = None) -> Layout:
    """The group's layout, agreed by one all-gather of 5 int64 per rank on every call."""
    group = vp.group if vp.group is not None else dist.group.WORLD
    if not dist.is_available() or not dist.is_initialized():
        if local_error is not None:
            raise local_error
        raise RuntimeError("vocab_parallel needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group)")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor([-1 if vp.vocab_start is None else vp.vocab_start, width_s, width_t,
                         _checksum(settings), status], dtype=torch.int64, device=device)
    table = all_gather(mine, group, size).tolist()
    starts, widths = _check_layout(table, size, local_error)
    return Layout(tuple(starts), tuple(widths), rank)


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
    status = _BAD_SHARD if not shard_ok else (_OK if local_error is None else _INPUT_ERROR)
    layout = layout_for(vp, width_s, width_t, device, settings, status, local_error)
    group = vp.group if vp.group is not None else dist.group.WORLD
    return VocabParallelReducer(group, layout, _checksum(settings), device)


def _grad_flags(*ts: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else bool(t.requires_grad) for t in ts)


def fused_setup(vp: VocabParallel, h: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                u: torch.Tensor, labels: torch.Tensor | None, bs: torch.Tensor | None,
                bt: torch.Tensor | None, opts: KDOptions, device: torch.device,
                local_error: Exception | None = None) -> VocabParallelReducer:
    """Reducer for fused_linear_kd_loss on head shards w [Vs_local, Ds], u [Vt_local, Dt]."""
    ok = w.dim() == 2 and u.dim() == 2 and w.shape[0] >= 1 and u.shape[0] >= 1
    settings = settings_key(opts, "fused", tuple(h.shape), tuple(g.shape), str(h.dtype),
                            str(w.dtype), str(g.dtype), str(u.dtype), labels is None,
                            _grad_flags(h, w, bs, g, u, bt), str(_autocast(device)))
    return setup(vp, w.shape[0] if ok else 0, u.shape[0] if ok else 0, device, settings, ok,
                 local_error)


def logits_setup(vp: VocabParallel, zs: torch.Tensor, zt: torch.Tensor,
                 labels: torch.Tensor | None, opts: KDOptions, device: torch.device,
                 local_error: Exception | None = None) -> VocabParallelReducer:
    """Reducer for kd_loss on logit shards zs [..., Vs_local], zt [..., Vt_local]."""
    ok = zs.dim() >= 1 and zt.dim() >= 1 and zs.shape[-1] >= 1 and zt.shape[-1] >= 1
    settings = settings_key(opts, "logits", tuple(zs.shape[:-1]), tuple(zt.shape[:-1]),
                            str(zs.dtype), str(zt.dtype), labels is None, _grad_flags(zs, zt))
    return setup(vp, zs.shape[-1] if ok else 0, zt.shape[-1] if ok else 0, device, settings, ok,
                 local_error)


def _autocast(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
        else None


def sparse_setup(vp: VocabParallel, what: str, lead: tuple, width: int, ok: bool,
                 dtypes: tuple, labels: torch.Tensor | None, grad_flags: tuple, opts,
                 device: torch.device, local_error: Exception | None = None
                 ) -> VocabParallelReducer:
    """Reducer for the sparse-teacher losses on a student shard of ``width`` vocabulary rows
    (head rows or logit columns); teacher ids are global, so only the student is sharded."""
    settings = settings_key(opts, what, lead, *dtypes, labels is None, grad_flags,
                            str(_autocast(device)))
    return setup(vp, width if ok else 0, width if ok else 0, device, settings, ok, local_error)
