"""The checks every teacher answer passes before it becomes a target.

A target is ``ids`` int32 [B, L, K] and ``logprobs`` float32 [B, L, K]: per position the
teacher's top-K (T = 1) log-probs, most likely first, an empty slot being id -1 with
log-prob 0. A failure names the URL, the row (of the caller's batch), the position and the
field of the server's answer it came from.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import TeacherResponseError

LOGPROB_TOL = 1e-4   # a log-prob may exceed 0 by rounding, no more
MASS_TOL = 1e-3      # the kept probabilities of a position sum to at most 1 + this
EMPTY_ID = -1

FieldOf = Callable[[int, int], str]


def _default_field(row: int, pos: int) -> str:
    return f"targets[{row}, {pos}]"


def check_targets(ids: np.ndarray, logprobs: np.ndarray, *, url: str, rows: int, length: int,
                  k: int, vocab_size: int | None = None, row_offset: int = 0,
                  field: FieldOf = _default_field) -> None:
    """Raise ``TeacherResponseError`` unless (ids, logprobs) is a well-formed target for
    ``rows`` sequences of ``length`` tokens. ``field(row, pos)`` names where in the server's
    answer a position came from (row local to the request; the message adds ``row_offset``)."""
    want = (rows, length, k)
    for name, arr in (("ids", ids), ("logprobs", logprobs)):
        if tuple(arr.shape) != want:
            raise TeacherResponseError(
                f"the teacher at {url} answered {name} of shape {list(arr.shape)} for rows "
                f"{row_offset}..{row_offset + rows - 1}; expected [rows, L, K] = {list(want)}")

    def fail(mask: np.ndarray, problem: Callable[[int, int, int], str]) -> None:
        b, t, j = (int(v) for v in np.argwhere(mask)[0])
        raise TeacherResponseError(
            f"the teacher at {url} answered a bad target at row {b + row_offset}, position "
            f"{t}: {field(b, t)} slot {j}: {problem(b, t, j)}")

    filled = ids != EMPTY_ID
    bad = ids < EMPTY_ID
    if vocab_size is not None:
        bad |= ids >= vocab_size
    if bad.any():
        top = "vocab" if vocab_size is None else vocab_size
        fail(bad, lambda b, t, j: f"token id {ids[b, t, j]} is out of range [0, {top}) "
             f"(field ids)")
    lp = logprobs.astype(np.float64)
    if (~np.isfinite(lp)).any():
        fail(~np.isfinite(lp), lambda b, t, j: f"log-prob {lp[b, t, j]} is not finite "
             f"(field logprobs)")
    if (~filled & (lp != 0.0)).any():
        fail(~filled & (lp != 0.0), lambda b, t, j: f"an empty slot (id -1) has log-prob "
             f"{lp[b, t, j]}, expected 0")
    if (filled & (lp > LOGPROB_TOL)).any():
        fail(filled & (lp > LOGPROB_TOL), lambda b, t, j: f"log-prob {lp[b, t, j]:.6g} > 0 "
             f"(tolerance {LOGPROB_TOL:g}; field logprobs)")
    if k > 1:
        s = np.sort(np.where(filled, ids, EMPTY_ID).astype(np.int64), axis=-1)
        dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] != EMPTY_ID)
        if dup.any():
            b, t, _ = (int(v) for v in np.argwhere(dup)[0])
            j = int(np.argwhere(dup[b, t])[0][0])
            tok = int(s[b, t, j])
            mask = np.zeros_like(filled)
            mask[b, t, int(np.argwhere(ids[b, t] == tok)[1][0])] = True
            fail(mask, lambda b, t, j: f"token id {tok} appears more than once in the position "
             f"(field ids)")
    mass = np.where(filled, np.exp(np.minimum(lp, 0.0)), 0.0).sum(-1)
    over = mass > 1.0 + MASS_TOL
    if over.any():
        b, t = (int(v) for v in np.argwhere(over)[0])
        raise TeacherResponseError(
            f"the teacher at {url} answered a bad target at row {b + row_offset}, position "
            f"{t}: {field(b, t)}: the probabilities of the position sum to {mass[b, t]:.6f} "
            f"> 1 + {MASS_TOL:g} (field logprobs)")
