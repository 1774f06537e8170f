"""Vocab-parallel (tensor-parallel) distillation over torch.distributed.

Each rank of a process group holds a contiguous slice [start, start + width) of the rows of
both LM heads (as Megatron's column-parallel head does); hidden states and labels are
replicated. The chunk driver runs unchanged on the local slice and calls this module's
reducer at three points:

    merge_stats   one all-gather per chunk of the [C, 9] partial row stats (plus one header
                  row, see below), then the deterministic local merge of row_stats.py
    sum_rows      one all-gather per chunk of the [C, 2] mix sums (divergences with a mix
                  pass only), summed locally in rank order
    finish_grad_hidden  one SUM all-reduce of grad_student_hidden (fp32), at the end

grad_weight needs no collective: each rank's head gradient is its slice of the full one.

All-gather plus a local merge in rank order makes every rank compute bit-identical row
losses, run after run. The header row carries a checksum of the call's settings, a chunk
counter and the shard bounds, so ranks that disagree raise the same error together instead
of producing different losses (every rank sees every header, so the decision is shared).

Every call first agrees on the layout (every rank's start and width) with one all-gather
of 5 int64 per rank, which also compares the settings checksum and whether each rank's own
input checks passed: an input that fails on one rank only raises on every rank, instead of
leaving the others waiting in the first chunk's collective.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from .options import KDOptions
from .row_stats import N_STATS, merge_partials

_HEADER_MAGIC = 4242.0  # marks a header row; exactly representable in fp32
_ID_LIMIT = 2**24  # integers below this are exact in fp32 header rows


@dataclass(frozen=True, eq=False)
class VocabParallel:
    """Vocab-parallel layout of the heads (or logits) passed to a kdkernels loss.

    ``group``: the torch.distributed process group whose ranks hold the vocab shards (None:
    the default group). ``vocab_start``: the first global vocabulary row of this rank's
    shard; None lets rank order define the layout (rank 0 holds the first rows). Heads,
    biases and logits are the local shards; hidden states and labels (global token ids) are
    the same on every rank.
    """

    group: Any = None
    vocab_start: int | None = None

    def __post_init__(self) -> None:
        vs = self.vocab_start
        if vs is not None and (isinstance(vs, bool) or not isinstance(vs, int) or vs < 0):
            raise ValueError(f"VocabParallel.vocab_start must be a non-negative int or None; "
                             f"got {vs!r}")
        if self.group is not None and not isinstance(self.group, dist.ProcessGroup):
            raise TypeError(f"VocabParallel.group must be a torch.distributed ProcessGroup or "
                            f"None; got {type(self.group).__name__}")


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


# torch 2.14 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Status column of the layout all-gather.
_OK, _BAD_SHARD, _INPUT_ERROR = 1, 0, 2


def clear_layout_cache() -> None:
    """Kept for compatibility: layouts are no longer cached (every call agrees on its
    layout), so there is nothing to clear after re-sharding a head."""


def _checksum(parts: tuple) -> int:
    # Python's hash() of strings differs between processes; crc32 of the repr does not.
    return zlib.crc32(repr(parts).encode())


def _all_gather(t: torch.Tensor, group, size: int) -> torch.Tensor:
    # Flat buffers: gloo wants the output to be the inputs concatenated along dim 0.
    out = torch.empty(size * t.numel(), dtype=t.dtype, device=t.device)
    _GATHER(out, t.contiguous().view(-1), group=group)
    return out.view(size, *t.shape)


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
    _check_tiling(starts, widths)
    return starts, widths


def _check_tiling(starts: list[int], widths: list[int]) -> None:
    order = sorted(range(len(starts)), key=lambda r: (starts[r], r))
    expect = 0
    for r in order:
        if starts[r] != expect:
            what = "overlaps" if starts[r] < expect else "leaves a gap before"
            shards = ", ".join(f"rank {q}: [{starts[q]}, {starts[q] + widths[q]})"
                               for q in range(len(starts)))
            raise ValueError(f"vocab_parallel: the shards must tile [0, V) without overlaps or "
                             f"gaps, but rank {r}'s shard starting at {starts[r]} {what} row "
                             f"{expect}; shards: {shards}")
        expect += widths[r]


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
    table = _all_gather(mine, group, size).tolist()
    starts, widths = _check_layout(table, size, local_error)
    return Layout(tuple(starts), tuple(widths), rank)


class VocabParallelReducer:
    """The chunk driver's reducer for one loss call over vocab shards (see reducer.py)."""

    def __init__(self, group, layout: Layout, settings_crc: int) -> None:
        self.group = group
        self.layout = layout
        self.size = len(layout.widths)
        self.vocab_start = layout.start
        self.vocab = layout.vocab
        self._crc = settings_crc
        self._chunk = 0
        self.device_type = "cpu"

    def _header(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        vals = [self._crc & 0xFFF, (self._crc >> 12) & 0xFFF, self._crc >> 24,
                self._chunk % _ID_LIMIT, rows % _ID_LIMIT, self.vocab_start % _ID_LIMIT,
                self.layout.widths[self.layout.rank] % _ID_LIMIT, float(self.size),
                _HEADER_MAGIC]
        return torch.tensor([vals], dtype=like.dtype, device=like.device)

    def _verify(self, headers: torch.Tensor) -> None:
        """Same decision on every rank: it only reads the gathered headers."""
        h = headers.tolist()
        if any(row[:5] != h[0][:5] or row[7:] != h[0][7:] for row in h):
            raise RuntimeError(
                f"vocab_parallel: ranks disagree on the loss call (settings checksum, chunk "
                f"index or chunk rows differ: {[row[:5] for row in h]}); call the loss with "
                f"the same options and replicated hidden states and labels on every rank")
        _check_tiling([int(row[5]) for row in h], [int(row[6]) for row in h])

    def merge_stats(self, partial: torch.Tensor) -> torch.Tensor:
        rows = partial.shape[0]
        send = torch.cat((self._header(rows, partial), partial), 0)
        got = _all_gather(send, self.group, self.size)
        self._verify(got[:, 0])
        self._chunk += 1
        return merge_partials(got[:, 1:])

    def sum_rows(self, partial: torch.Tensor) -> torch.Tensor:
        got = _all_gather(partial, self.group, self.size)
        out = got[0].clone()
        for r in range(1, self.size):  # fixed order: bit-identical on every rank
            out += got[r]
        return out

    def finish_grad_hidden(self, grad: torch.Tensor) -> torch.Tensor:
        # Summed in fp32 even for half inputs: each rank's part is rounded once, not the sum.
        acc = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
        acc = acc.contiguous()
        dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=self.group)
        return acc if acc.dtype == grad.dtype else acc.to(grad.dtype)


def _dtensor_shard(t: torch.Tensor | None, name: str, dim: int):
    """(local tensor, process group, vocab_start) for a DTensor sharded on `dim`, else None."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch built without distributed tensors
        return None
    if not isinstance(t, DTensor):
        return None
    dim = dim % t.dim()
    shard_dims = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    others_ok = all(isinstance(p, (Shard, Replicate)) for p in t.placements)
    if len(shard_dims) != 1 or not others_ok or t.placements[shard_dims[0]].dim != dim:
        raise ValueError(f"{name}: a DTensor head must be sharded on dim {dim} over exactly one "
                         f"mesh dimension and replicated over the others; got placements "
                         f"{t.placements}")
    mesh_dim = shard_dims[0]
    mesh = t.device_mesh
    parts = mesh.size(mesh_dim)
    coord = mesh.get_coordinate()[mesh_dim]
    # Shard follows torch.chunk: ceil(V / parts) rows per rank, the last ones shorter.
    per = -(-t.shape[dim] // parts)
    return t.to_local(), mesh.get_group(mesh_dim), min(coord * per, t.shape[dim])


def unwrap(vp: VocabParallel | None, named: dict[str, torch.Tensor | None], dim: int
           ) -> tuple[VocabParallel | None, dict[str, torch.Tensor | None]]:
    """Replace DTensor shards by their local tensors; infer vocab_parallel from them."""
    out = dict(named)
    found = {}
    for name, t in named.items():
        got = _dtensor_shard(t, name, dim if "bias" not in name else 0)
        if got is not None:
            out[name], group, start = got
            found[name] = (group, start)
    if not found:
        return vp, out
    (first, (group, start)), *rest = found.items()
    for name, (g, s) in rest:
        if g is not group or s != start:
            raise ValueError(f"vocab_parallel: DTensor {name} is sharded over another group or "
                             f"offset than {first}")
    if vp is not None and vp.group is not None and vp.group is not group:
        raise ValueError(f"vocab_parallel.group differs from the group {first} is sharded over")
    if vp is not None and vp.vocab_start is not None and vp.vocab_start != start:
        raise ValueError(f"vocab_parallel.vocab_start={vp.vocab_start} differs from the offset "
                         f"{start} of the DTensor {first}")
    return VocabParallel(group, start), out


def settings_key(opts: KDOptions, *parts: Any) -> tuple:
    """What every rank must agree on: all options plus shapes, dtypes and grad flags."""
    return (tuple(getattr(opts, f) for f in ("divergence", "beta", "skew", "temperature",
                                              "scale_by_t2", "kd_weight", "ce_weight",
                                              "student_softcap", "teacher_softcap",
                                              "ignore_index", "reduction", "num_items",
                                              "chunk_size", "max_workspace_bytes", "impl",
                                              "return_components")),
            torch.is_grad_enabled(), *parts)


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
    reducer = VocabParallelReducer(group, layout, _checksum(settings))
    reducer.device_type = device.type
    return reducer


def agree_chunk_size(opts: KDOptions, reducer: VocabParallelReducer,
                     bytes_per_logit: int) -> KDOptions:
    """Fix the rows per chunk from the widest shard, so that every rank cuts the same chunks
    (the driver would otherwise size chunks from each rank's own, possibly uneven, width)."""
    if opts.chunk_size is not None:
        return opts
    on = getattr(opts, "workspace_bytes_on", None)  # per-device budget where the core has one
    budget = on(reducer.device_type) if on is not None else opts.workspace_bytes
    rows = max(1, budget // max(1, reducer.layout.max_width * bytes_per_logit))
    return replace(opts, chunk_size=rows)


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


def plan_options(opts: KDOptions, reducer: Any, bytes_per_logit: int) -> KDOptions:
    """opts with the chunk rows every rank agrees on (unchanged for a single process)."""
    if not isinstance(reducer, VocabParallelReducer):
        return opts
    return agree_chunk_size(opts, reducer, bytes_per_logit)


__all__ = ["N_STATS", "Layout", "VocabParallel", "VocabParallelReducer", "clear_layout_cache"]
