"""Training batches from a teacher-logit cache (`kdk distill --teacher-cache`).

A batch holds cached sequences (input ids with the teacher's top-K ids and log-probs per
position) as windows of --seq-len tokens. Like windows.train_batch, a batch is a pure function
of (seed, step, micro-batch, rank), so --resume needs no loader state: micro-batch g =
(step * grad_accum + micro) * world + rank takes items g*B ... g*B + B - 1 of an endless
stream that visits the training sequences once per epoch, in a seeded per-epoch order
("shuffle") or in cache order ("sequential": the embedded default writes its cache in the
dense student's batch order). Ranks read disjoint sequences.

A position whose K slots are all empty has no teacher target (the prompt and padding of a
generated cache, kdk cache-teacher --generate): such a batch also carries labels [B, S - 1]
with ignore_index there, so that neither KD nor CE nor the token count covers it. Caches with
a target at every position (kdk cache-teacher over text) get no labels: batches unchanged.
A shorter --seq-len cuts generated sequences at their end (the prompt is kept), other cached
sequences at a random window.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import torch

from .streams import IGNORE_INDEX

ORDERS = ("shuffle", "sequential")


def _generator(*key: Any) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(("kdk-cache-batches", *key)).encode()))
    return g


class CacheData:
    """Sequences [train.start, train.stop) of a TeacherCache as training batches and
    [held.start, held.stop) as held-out windows (empty when held-out data comes from
    elsewhere)."""

    def __init__(self, cache, *, train: range, held: range = range(0),
                 order: str = "shuffle") -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
        if len(train) < 1:
            raise ValueError(f"the teacher cache {cache.path} has no sequences to train on "
                             f"({len(cache)} in all, {len(held)} held out)")
        self.cache = cache
        self.train = train
        self.held = held
        self.order = order
        self.seq_len = int(cache.manifest["seq_len"])
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def open(cls, path: str | Path, *, heldout_fraction: float = 0.0, order: str = "shuffle",
             verify: bool = True) -> CacheData:
        """The cache at ``path``; with heldout_fraction > 0 its last ceil(fraction * n)
        sequences (at least one) are held out and never trained on."""
        from ...cache import TeacherCache

        cache = TeacherCache(path, verify=verify)
        if not cache.complete:
            raise ValueError(f"--teacher-cache {path} is incomplete (its writer was stopped): "
                             "rerun the same `kdk cache-teacher` command to finish it")
        n = len(cache)
        n_held = max(1, math.ceil(heldout_fraction * n)) if heldout_fraction > 0 else 0
        if n_held and n - n_held < 1:
            raise ValueError(f"--teacher-cache {path} holds {n} sequence(s): too few to hold out "
                             "a held-out part and train on the rest; pass --data for held-out "
                             "text or write a larger cache")
        return cls(cache, train=range(0, n - n_held), held=range(n - n_held, n), order=order)

    @property
    def top_k(self) -> int:
        return int(self.cache.manifest["top_k"])

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len > self.seq_len:
            raise ValueError(f"--seq-len {seq_len} is longer than the teacher cache's sequences "
                             f"(seq_len {self.seq_len}); pass --seq-len {self.seq_len} or less")
        if seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2 (one input and its label); got {seq_len}")

    def _index(self, seed: int, position: int) -> int:
        n = len(self.train)
        epoch, within = divmod(position, n)
        if self.order == "sequential":
            return self.train.start + within
        perm = self._perms.get((seed, epoch))
        if perm is None:
            if len(self._perms) > 4:  # only the current epoch (and its neighbours) are read
                self._perms.clear()
            perm = self._perms[seed, epoch] = torch.randperm(n, generator=_generator(seed, epoch))
        return self.train.start + int(perm[within])

    def train_batch(self, batch_size: int, seq_len: int, *, seed: int, step: int, micro: int = 0,
                    rank: int = 0, grad_accum: int = 1,
                    world_size: int = 1) -> dict[str, torch.Tensor]:
        """input_ids [B, S] int64, teacher_ids [B, S, K] int32, teacher_logprobs [B, S, K]."""
        self.check_seq_len(seq_len)
        g = (step * grad_accum + micro) * world_size + rank
        rows = [self.cache[self._index(seed, g * batch_size + j)] for j in range(batch_size)]
        slack = self.seq_len - seq_len
        if slack and self.cache.manifest.get("layout") == "generated":
            # a prompt and its generation: cut at seq_len, never cut from the prompt's side
            starts = torch.zeros(batch_size, dtype=torch.int64)
        elif slack:  # a random window of each longer cached sequence
            starts = torch.randint(0, slack + 1, (batch_size,), generator=_generator(seed, g))
        else:
            starts = torch.zeros(batch_size, dtype=torch.int64)
        win = [(r, int(s)) for r, s in zip(rows, starts, strict=True)]
        out = {name: torch.stack([r[name][s:s + seq_len] for r, s in win])
               for name in ("input_ids", "teacher_ids", "teacher_logprobs")}
        out["input_ids"] = out["input_ids"].long()  # embeddings and labels want int64
        labels = labels_of(out["input_ids"], out["teacher_ids"])
        if labels is not None:
            out["labels"] = labels
        return out

    def heldout_batches(self, batch_size: int, seq_len: int,
                        n_batches: int) -> list[torch.Tensor]:
        """The first seq_len tokens of the held-out sequences (at most batch_size * n_batches
        of them, evenly spread) as int64 batches; the same windows for every model."""
        self.check_seq_len(seq_len)
        n = len(self.held)
        if n == 0:
            raise ValueError("this teacher cache has no held-out sequences")
        take = min(n, batch_size * n_batches)
        picks = [self.held.start + (i * n) // take for i in range(take)]
        rows = [self.cache[i] for i in picks]
        windows = torch.stack([r["input_ids"][:seq_len] for r in rows]).long()
        labels = labels_of(windows, torch.stack([r["teacher_ids"][:seq_len] for r in rows]))
        if labels is None:
            return list(windows.split(batch_size))
        # generated sequences: held-out CE over the generated tokens only, as trained
        return list(zip(windows.split(batch_size), labels.split(batch_size), strict=True))


def labels_of(input_ids: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, S - 1] next-token labels with IGNORE_INDEX where position t has no valid slot
    (no teacher target), or None when every position has one."""
    has_target = (teacher_ids[:, :-1] >= 0).any(-1)
    if bool(has_target.all()):
        return None
    return input_ids[:, 1:].masked_fill(~has_target, IGNORE_INDEX)
