"""Cross-tokenizer alignment: which logits rows form each aligned group, on both sides.

Semantics are those of TRL 1.16's ``ULDLoss`` (``trl.experimental.gold``), restated here:

* Answer span of a sample: ``start`` = the first position whose label is not ``ignore_index``,
  ``size`` = the number of such labels (the span is ``[start, start + size)``), minus 1 per EOS
  skip. A sample with ``size <= 0`` on either side has no group.
* Without offsets (positional ULD) the first ``min(size_s, size_t)`` positions pair one to one.
* With byte offsets, a two-pointer walk over the spans' end bytes advances the side whose token
  ends first; a group closes where both sides end on the same byte. Tokens left when one side runs
  out form a last group; a pair with an empty side is dropped.
* ``merge="observed"``: logits row ``start + k`` gives the distribution at answer position ``k``;
  a group's base row is its first position, the others multiply in ``p[row, token]`` of their
  actual token. ``merge="bayesian"``: logits are taken one row earlier (row ``start + k - 1``
  predicts token ``k``); the base row is the group's last position, the earlier ones are the
  scalars. A span starting at position 0 has no row before it: its first aligned group pair
  (offsets) or its first position (positional) is dropped on both sides.

The walk runs on the host over plain integer lists (one transfer of labels and offsets); the
result is flat index tensors that the losses gather with, so no loss code loops over samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MERGES = ("observed", "bayesian")


@dataclass(frozen=True)
class SideGroups:
    """One side's groups, flattened over the batch (row indices into ``logits.view(-1, V)``)."""

    base_rows: torch.Tensor  # int64 [G]: b * L + row of each group's base distribution
    scalar_rows: torch.Tensor  # int64 [S]: rows whose p[row, token] multiply a group
    scalar_tokens: torch.Tensor  # int64 [S]: the actual token of each scalar row
    scalar_group: torch.Tensor  # int64 [S]: the group (0..G-1) each scalar multiplies


@dataclass(frozen=True)
class AlignedGroups:
    """Both sides' groups; group g of the student pairs with group g of the teacher."""

    student: SideGroups
    teacher: SideGroups
    sample: torch.Tensor  # int64 [G]: the sample of each group (non-decreasing)
    groups_per_sample: torch.Tensor  # int64 [B]: 0 for a sample without answer groups

    @property
    def num_groups(self) -> int:
        return int(self.sample.numel())


def _check_ids_tensor(name: str, t, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        want = "[B, L]" if ndim == 2 else "[B, L, 2]"
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_merge(merge) -> str:
    if not isinstance(merge, str) or merge not in MERGES:
        raise ValueError(f"merge must be one of {', '.join(MERGES)}; got {merge!r}")
    return merge


def _spans(labels: torch.Tensor, ignore_index: int, skip_eos: bool) -> tuple[list, list]:
    mask = labels != ignore_index
    size = mask.sum(dim=1)
    # argmax of a bool row is its first True; an empty row gives 0 (its size is 0 anyway)
    start = torch.where(size > 0, mask.to(torch.int8).argmax(dim=1), torch.zeros_like(size))
    size = size - int(skip_eos)
    return start.tolist(), size.tolist()


def _walk(s_ends: list[int], t_ends: list[int]) -> list[tuple[int, int, int, int]]:
    """GOLD's two-pointer walk: ``(s_lo, s_hi, t_lo, t_hi)`` per group (half-open ranges of
    answer positions), the last, unclosed group included even with an empty side."""
    groups = []
    s_start = t_start = s = t = 0
    n_s, n_t = len(s_ends), len(t_ends)
    while s < n_s and t < n_t:
        if s_ends[s] < t_ends[t]:
            s += 1
        elif s_ends[s] > t_ends[t]:
            t += 1
        else:
            s += 1
            t += 1
            groups.append((s_start, s, t_start, t))
            s_start, t_start = s, t
    if s < n_s or t < n_t:
        groups.append((s_start, n_s, t_start, n_t))
    return groups


def _check_offsets(name: str, offsets: torch.Tensor, start: list[int], size: list[int],
                   live: list[bool]) -> None:
    """Byte spans must not go backwards within an answer span (the walk relies on it): start
    <= end at each position, starts and ends non-decreasing. Vectorised; the message names
    the first offending sample and position."""
    B, L = offsets.shape[:2]
    pos = torch.arange(L)
    lo = torch.tensor(start, dtype=torch.long)[:, None]
    hi = lo + torch.tensor(size, dtype=torch.long)[:, None]
    inside = (pos >= lo) & (pos < hi) & torch.tensor(live, dtype=torch.bool)[:, None]
    offs = offsets.to("cpu", torch.long)
    bad = inside & (offs[..., 1] < offs[..., 0])
    back = inside[:, 1:] & inside[:, :-1] & (offs[:, 1:] < offs[:, :-1]).any(-1)
    bad[:, 1:] |= back
    if bool(bad.any()):
        b, k = (int(v) for v in bad.nonzero()[0])
        here = tuple(offs[b, k].tolist())
        if here[1] < here[0]:
            raise ValueError(f"{name} must have start <= end; sample {b}, position {k} has "
                             f"{here}")
        raise ValueError(f"{name} must be non-decreasing within the answer span; sample {b}, "
                         f"position {k} has {here} after {tuple(offs[b, k - 1].tolist())}")


def _check_id_range(name: str, ids: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                    vocab_size: int | None) -> None:
    if vocab_size is None:
        return
    used = ids[labels != ignore_index]
    if used.numel() == 0:
        return
    lo, hi = int(used.min()), int(used.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} has id {bad} in the answer span, outside [0, {vocab_size}) "
                         "(the logits' vocabulary)")


def align_batch(
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    student_input_ids: torch.Tensor,
    teacher_input_ids: torch.Tensor,
    student_offsets: torch.Tensor | None = None,
    teacher_offsets: torch.Tensor | None = None,
    *,
    merge: str = "observed",
    skip_student_eos: bool = True,
    skip_teacher_eos: bool = True,
    ignore_index: int = -100,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> AlignedGroups:
    """Aligned groups of a batch (see the module docstring for the rules).

    ``student_vocab_size`` / ``teacher_vocab_size``, when given, bound the input ids of the
    answer spans (the merge reads ``p[row, id]``). The index tensors are on ``device``
    (default: the student labels' device)."""
    check_merge(merge)
    _check_flag("skip_student_eos", skip_student_eos)
    _check_flag("skip_teacher_eos", skip_teacher_eos)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    sl = _check_ids_tensor("student_labels", student_labels, 2)
    tl = _check_ids_tensor("teacher_labels", teacher_labels, 2)
    si = _check_ids_tensor("student_input_ids", student_input_ids, 2)
    ti = _check_ids_tensor("teacher_input_ids", teacher_input_ids, 2)
    if si.shape != sl.shape:
        raise ValueError(f"student_input_ids must have student_labels' shape {tuple(sl.shape)}, "
                         f"got {tuple(si.shape)}")
    if ti.shape != tl.shape:
        raise ValueError(f"teacher_input_ids must have teacher_labels' shape {tuple(tl.shape)}, "
                         f"got {tuple(ti.shape)}")
    if tl.shape[0] != sl.shape[0]:
        raise ValueError(f"teacher_labels has batch size {tl.shape[0]}, student_labels "
                         f"{sl.shape[0]}: they must agree")
    extended = student_offsets is not None or teacher_offsets is not None
    if extended:
        for name, offs, lab in (("student_offsets", student_offsets, sl),
                                ("teacher_offsets", teacher_offsets, tl)):
            if offs is None:
                other = "teacher_offsets" if name == "student_offsets" else "student_offsets"
                raise ValueError(f"{name} is None but {other} is given: byte-span alignment "
                                 "needs both (or neither, for positional pairing)")
            _check_ids_tensor(name, offs, 3)
            if offs.shape != (*lab.shape, 2):
                raise ValueError(f"{name} must be [B, L, 2] = {(*lab.shape, 2)}, got "
                                 f"{tuple(offs.shape)}")
    _check_id_range("student_input_ids", si, sl, ignore_index, student_vocab_size)
    _check_id_range("teacher_input_ids", ti, tl, ignore_index, teacher_vocab_size)

    B, Ls = sl.shape
    Lt = tl.shape[1]
    bayes = merge == "bayesian"
    s_start, s_size = _spans(sl, ignore_index, skip_student_eos)
    t_start, t_size = _spans(tl, ignore_index, skip_teacher_eos)
    if extended:
        live = [ns > 0 and nt > 0 for ns, nt in zip(s_size, t_size, strict=True)]
        _check_offsets("student_offsets", student_offsets, s_start, s_size, live)
        _check_offsets("teacher_offsets", teacher_offsets, t_start, t_size, live)
        s_ends_all = student_offsets[..., 1].tolist()
        t_ends_all = teacher_offsets[..., 1].tolist()

    # One entry per group, in sample order: its sample and each side's [lo, hi) positions
    # (absolute positions in the sequence; the logits rows are these, one earlier for bayes).
    gb: list[int] = []
    s_lo: list[int] = []
    s_hi: list[int] = []
    t_lo: list[int] = []
    t_hi: list[int] = []
    for b in range(B):
        ns, nt = s_size[b], t_size[b]
        if ns <= 0 or nt <= 0:
            continue
        s0, t0 = s_start[b], t_start[b]
        if extended:
            groups = _walk(s_ends_all[b][s0: s0 + ns], t_ends_all[b][t0: t0 + nt])
            if bayes and (s0 == 0 or t0 == 0):
                # No row predicts position 0: drop the first group pair, on both sides. The
                # walk of the shortened spans is the rest of this one (it restarts at a
                # closure), so the remaining groups keep their positions.
                groups = groups[1:]
            for a, c, d, e in groups:
                if c > a and e > d:  # pairs with an empty side are dropped
                    gb.append(b)
                    s_lo.append(s0 + a)
                    s_hi.append(s0 + c)
                    t_lo.append(t0 + d)
                    t_hi.append(t0 + e)
        else:
            if bayes and (s0 == 0 or t0 == 0):
                s0, t0, ns, nt = s0 + 1, t0 + 1, ns - 1, nt - 1
            n = max(0, min(ns, nt))
            gb += [b] * n
            s_lo += range(s0, s0 + n)
            s_hi += range(s0 + 1, s0 + n + 1)
            t_lo += range(t0, t0 + n)
            t_hi += range(t0 + 1, t0 + n + 1)

    dev = torch.device(device) if device is not None else sl.device
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    sample = long(gb)
    student = _side_groups(sample, long(s_lo), long(s_hi), si, Ls, bayes, dev)
    teacher = _side_groups(sample, long(t_lo), long(t_hi), ti, Lt, bayes, dev)
    return AlignedGroups(student=student, teacher=teacher, sample=sample.to(dev),
                         groups_per_sample=torch.bincount(sample, minlength=B).to(dev))


def _side_groups(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 input_ids: torch.Tensor, L: int, bayes: bool, dev: torch.device) -> SideGroups:
    """One side's flat rows from its groups' position ranges [lo, hi) (vectorised)."""
    shift = -1 if bayes else 0  # bayesian: logits row k - 1 gives the distribution of token k
    n = hi - lo
    base = hi - 1 if bayes else lo
    grp = torch.repeat_interleave(torch.arange(sample.numel()), n)
    first = torch.cumsum(n, 0) - n
    pos = lo[grp] + torch.arange(grp.numel()) - first[grp]
    keep = pos != base[grp]
    grp, pos = grp[keep], pos[keep]
    flat = sample[grp] * L + pos
    tokens = input_ids.reshape(-1).cpu()[flat].long()
    return SideGroups(base_rows=(sample * L + base + shift).to(dev),
                      scalar_rows=(flat + shift).to(dev), scalar_tokens=tokens.to(dev),
                      scalar_group=grp.to(dev))
