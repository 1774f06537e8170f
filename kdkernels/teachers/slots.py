"""Turning one position's (token id, log-prob) entries into K target slots.

Servers clamp a log-prob of -inf: vLLM to -9999, SGLang's orjson to null (JSON has no
-Infinity), its base64 arrays keep -inf. Each is an empty slot (id -1, log-prob 0), never a
token with that log-prob. The kept entries are packed first, in the order given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .errors import TeacherResponseError
from .validate import EMPTY_ID

CLAMP = -9999.0


def is_empty(logprob: float | None) -> bool:
    """A clamped or absent log-prob (NaN is left to the validation, which names it)."""
    return logprob is None or logprob <= CLAMP or logprob == -math.inf


def empty_targets(rows: int, length: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.full((rows, length, k), EMPTY_ID, dtype=np.int32),
            np.zeros((rows, length, k), dtype=np.float32))


def fill(ids: np.ndarray, logprobs: np.ndarray, pairs: Iterable[tuple[int, float | None]],
         k: int) -> None:
    """Write the first ``k`` of ``pairs`` (already in rank order) into one position's slots
    ``ids``/``logprobs`` [K], dropping empty ones."""
    j = 0
    for n, (tok, lp) in enumerate(pairs):
        if n >= k:
            break
        if is_empty(lp):
            continue
        ids[j] = tok
        logprobs[j] = lp
        j += 1


def token_id(value: object, where: str) -> int:
    """A token id from JSON (an int in int32 range), else a ``TeacherResponseError``."""
    if isinstance(value, bool) or not isinstance(value, int) or not -2**31 <= value < 2**31:
        raise TeacherResponseError(f"{where}: token id {value!r} is not an int32 integer")
    return value


def logprob(value: object, where: str) -> float | None:
    """A log-prob from JSON: a number or null (a clamp), else a ``TeacherResponseError``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TeacherResponseError(f"{where}: log-prob {value!r} is not a number")
    return float(value)


def fill_rows(ids: np.ndarray, logprobs: np.ndarray, tok: np.ndarray, val: np.ndarray,
              k: int) -> None:
    """``fill`` for many positions at once: ``tok``/``val`` [n, k'] in any order are sorted
    by log-prob (ties by id), the first ``k`` kept, empty ones dropped, into ``ids``/
    ``logprobs`` [n, K]."""
    if tok.shape[-1] == 0 or tok.shape[0] == 0:
        return
    val = val.astype(np.float64)
    key = np.where(np.isnan(val), -np.inf, val)
    order = np.lexsort((tok, -key), axis=-1)[:, :k]
    tok = np.take_along_axis(tok, order, -1)
    val = np.take_along_axis(val, order, -1)
    empty = (val <= CLAMP) | (val == -np.inf)
    pack = np.argsort(empty, axis=-1, kind="stable")
    tok = np.take_along_axis(tok, pack, -1)
    val = np.take_along_axis(val, pack, -1)
    empty = np.take_along_axis(empty, pack, -1)
    n = tok.shape[1]
    ids[:, :n] = np.where(empty, EMPTY_ID, tok)
    logprobs[:, :n] = np.where(empty, 0.0, val)
