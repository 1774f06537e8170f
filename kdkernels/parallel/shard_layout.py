"""Shard layout and agreement: every call of a vocab-parallel loss first agrees, in one
all-gather of 5 int64 per rank, on each rank's shard, a checksum of the call's settings and
whether each rank's own input checks passed; an input that fails on one rank raises on every
rank together, instead of leaving the others waiting in the first chunk's collective. The
shards must tile the vocabulary (check_tiling)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .collectives import all_gather
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
OK, BAD_SHARD, INPUT_ERROR = 1, 0, 2


def checksum(parts: tuple) -> int:
    # Python's hash() of strings differs between processes; crc32 of the repr does not.
    return zlib.crc32(repr(parts).encode())


def _check_layout(table: list[list[int]], size: int,
                  local_error: Exception | None = None) -> tuple[list[int], list[int]]:
    """Starts and widths from the gathered rows (given start or -1, ws, wt, crc, status);
    raises the same error on every rank (every rank sees the same table), the failing
    rank's own message on the ranks whose input checks failed."""
    failed = [r for r, row in enumerate(table) if row[4] == INPUT_ERROR]
    if failed:
        what = f"vocab_parallel: rank(s) {failed} rejected their inputs"
        if local_error is not None:
            raise type(local_error)(f"{what}; here: {local_error}") from local_error
        raise ValueError(f"{what} (the error raised there says why); no rank computed the "
                         f"loss")
    bad = [r for r, row in enumerate(table) if row[4] == BAD_SHARD or row[1] < 1]
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
               settings: tuple, status: int = OK,
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
                         checksum(settings), status], dtype=torch.int64, device=device)
    table = all_gather(mine, group, size).tolist()
    starts, widths = _check_layout(table, size, local_error)
    return Layout(tuple(starts), tuple(widths), rank)


def check_tiling(starts: list[int], widths: list[int]) -> None:
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
