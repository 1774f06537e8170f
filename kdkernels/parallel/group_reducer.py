"""The chunk driver's reducer over a vocab-parallel group (a reducer.Reducer).

Per chunk: one all-gather of the [C, len(STATS)] partial row stats plus one header row,
then the deterministic local merge of row_stats.py (``merge_stats``); one all-gather of the
[C, len(MIX)] mix sums, summed in rank order (``sum_rows``, divergences with a mix pass);
at the end one SUM all-reduce of grad_student_hidden in fp32 (``finish_grad_hidden``).
grad_weight needs no collective: each rank's head gradient is its slice of the full one.
The header row carries a checksum of the call's settings, a chunk counter and the shard
bounds, so ranks that disagree raise the same error together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..layouts import Columns
from ..row_stats import merge_partials, merge_student_partials
from .collectives import all_gather
from .shard_layout import Layout, check_tiling

_HEADER_MAGIC = 4242.0  # marks a header row; exactly representable in fp32
_ID_LIMIT = 2**24  # integers below this are exact in fp32 header rows
# The header row prepended to each chunk's stats (as wide as a stats row): what every rank
# must agree on (the settings checksum in three 12-bit parts, chunk index, chunk rows, the
# group size, the magic) and the shard bounds that must tile the vocabulary.
HEADER = Columns("Header", ("crc_lo", "crc_mid", "crc_hi", "chunk", "rows", "vocab_start",
                            "width", "size", "magic"))
_AGREED = ("crc_lo", "crc_mid", "crc_hi", "chunk", "rows", "size", "magic")


class VocabParallelReducer:
    """The chunk driver's reducer for one loss call over vocab shards (see reducer.py)."""

    def __init__(self, group, layout: Layout, settings_crc: int,
                 device: torch.device | None = None) -> None:
        self.group = group
        self.layout = layout
        self.size = len(layout.widths)
        self.vocab_start = layout.start
        self.vocab = layout.vocab
        self._crc = settings_crc
        self._chunk = 0
        self._device = device

    def chunk_width(self, local_width: int) -> int:
        # Every rank cuts the same chunks: they are planned for the widest shard.
        return self.layout.max_width

    def _header(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        vals = dict(crc_lo=self._crc & 0xFFF, crc_mid=(self._crc >> 12) & 0xFFF,
                    crc_hi=self._crc >> 24, chunk=self._chunk % _ID_LIMIT,
                    rows=rows % _ID_LIMIT, vocab_start=self.vocab_start % _ID_LIMIT,
                    width=self.layout.widths[self.layout.rank] % _ID_LIMIT,
                    size=float(self.size), magic=_HEADER_MAGIC)
        return torch.tensor([[vals[name] for name in HEADER]], dtype=like.dtype,
                            device=like.device)

    def _verify(self, headers: torch.Tensor) -> None:
        """Same decision on every rank: it only reads the gathered headers."""
        h = [dict(zip(HEADER, row, strict=True)) for row in headers.tolist()]
        agreed = [tuple(row[k] for k in _AGREED) for row in h]
        if any(a != agreed[0] for a in agreed):
            raise RuntimeError(
                f"vocab_parallel: ranks disagree on the loss call (settings checksum, chunk "
                f"index or chunk rows differ: {agreed}); call the loss with the same options "
                f"and replicated hidden states and labels on every rank")
        check_tiling([int(row["vocab_start"]) for row in h], [int(row["width"]) for row in h])

    def _gather_checked(self, partial: torch.Tensor) -> torch.Tensor:
        """[size, C, W] of every rank's partial, after the header check (one all-gather)."""
        rows, width = partial.shape
        header = self._header(rows, partial)
        if width < len(HEADER):  # narrow partials travel padded to the header's width
            partial = torch.nn.functional.pad(partial, (0, len(HEADER) - width))
        elif width > len(HEADER):
            header = torch.nn.functional.pad(header, (0, width - len(HEADER)))
        got = all_gather(torch.cat((header, partial), 0), self.group, self.size)
        self._verify(got[:, 0, : len(HEADER)])
        self._chunk += 1
        return got[:, 1:, :width]

    def merge_stats(self, partial: torch.Tensor) -> torch.Tensor:
        return merge_partials(self._gather_checked(partial))

    def merge_student(self, partial: torch.Tensor) -> torch.Tensor:
        return merge_student_partials(self._gather_checked(partial))

    def sum_rows(self, partial: torch.Tensor) -> torch.Tensor:
        got = all_gather(partial, self.group, self.size)
        out = got[0].clone()
        for r in range(1, self.size):  # fixed order: bit-identical on every rank
            out += got[r]
        return out

    def raise_together(self, error: Exception | None) -> None:
        """One all-gather of a flag per rank: an input check that failed on some ranks
        (e.g. a teacher id out of range on one rank's copy) raises on all of them."""
        flag = torch.tensor([0.0 if error is None else 1.0], device=self._device)
        flags = all_gather(flag, self.group, self.size)[:, 0].tolist()
        failed = [r for r, f in enumerate(flags) if f]
        if not failed:
            return
        what = f"vocab_parallel: rank(s) {failed} rejected their inputs"
        if error is not None:
            raise type(error)(f"{what}; here: {error}") from error
        raise ValueError(f"{what} (the error raised there says why); no rank computed the "
                         f"loss")

    def finish_grad_hidden(self, grad: torch.Tensor) -> torch.Tensor:
        # Summed in fp32 even for half inputs: each rank's part is rounded once, not the sum.
        acc = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
        acc = acc.contiguous()
        dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=self.group)
        return acc if acc.dtype == grad.dtype else acc.to(grad.dtype)


