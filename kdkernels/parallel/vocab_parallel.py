"""The public description of a vocab-parallel layout, passed to the kdkernels losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


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
