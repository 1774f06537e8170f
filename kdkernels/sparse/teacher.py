"""The sparse teacher's inputs: their checks and the tempered teacher on each row's ids.

Every check runs once per call over the kept rows, on the inputs' device, with one host sync
when all is well; an error names the argument, the expected form and the first bad row.
Rows dropped by ``ignore_index`` are not checked (padding positions of a cache may hold
anything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backends.base import RowSpec
from .tails import REST_EPS

# How far the served log-probs may exceed what a distribution allows, by storage dtype: a
# log-prob above 0, or a row whose probabilities sum above 1. fp32 covers the logsumexp
# rounding of servers; 16-bit storage rounds each log-prob by up to 2^-9 (bf16) or 2^-12
# (fp16) relative, which moves sum q by up to that times the teacher's entropy (a few nats).
LOGPROB_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 4e-3,
                     torch.bfloat16: 1.6e-2}
ID_DTYPES = (torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_teacher_tensors(ids: object, logprobs: object, lead_shape: torch.Size,
                          lead_name: str, vocab: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Types, dtypes and shapes of teacher_ids / teacher_logprobs: [..., K] each, with the
    leading shape of ``lead_name``. ``vocab`` None: not known yet (vocab-parallel)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"teacher_ids must be a torch.Tensor, got {type(ids).__name__}")
    if not isinstance(logprobs, torch.Tensor):
        raise TypeError(f"teacher_logprobs must be a torch.Tensor, got "
                        f"{type(logprobs).__name__}")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"teacher_ids must be int32 or int64 token ids, got {ids.dtype}")
    if logprobs.dtype not in LOGPROB_TOLERANCE:
        raise TypeError(f"teacher_logprobs must be float32, bfloat16 or float16 (or float64) "
                        f"log-probs, got {logprobs.dtype}")
    if ids.dim() < 1 or ids.shape[:-1] != lead_shape:
        raise ValueError(f"teacher_ids must be [..., K] with the leading shape of {lead_name}, "
                         f"[{', '.join(map(str, lead_shape))}, K]; got {_shape(ids)}")
    if logprobs.shape != ids.shape:
        raise ValueError(f"teacher_logprobs must have the shape of teacher_ids, {_shape(ids)}; "
                         f"got {_shape(logprobs)}")
    k = ids.shape[-1]
    if k < 1:
        raise ValueError(f"teacher_ids must hold K >= 1 slots per row; got {_shape(ids)}")
    if vocab is not None and k > vocab:
        raise ValueError(f"teacher_ids holds K = {k} slots per row but the vocabulary has "
                         f"V = {vocab} ids; K must be <= V")
    if ids.device != logprobs.device:
        raise ValueError(f"teacher_ids is on {ids.device} but teacher_logprobs is on "
                         f"{logprobs.device}; all tensors must be on one device")
    return ids.reshape(-1, k), logprobs.reshape(-1, k)


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher on the kept rows, ready for the chunk driver (float64 on [kept, K])."""

    ids: torch.Tensor  # [kept, K] int64 global ids, 0 at empty slots
    valid: torch.Tensor  # [kept, K] bool
    lq: torch.Tensor  # [kept, K] tempered log q (keeps the covered mass), -inf at empty slots
    log_r: torch.Tensor  # [kept] log of the rest 1 - Q, clamped below at REST_EPS
    outside: torch.Tensor  # [kept] bool: the valid ids do not cover the whole vocabulary


def _first(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask.reshape(-1))[0, 0])


def _raise_bad(kind: int, ids, lp, valid, rows, flags, vocab, tol) -> None:
    """The message of the first failed check (only on failure: syncs freely)."""
    k = ids.shape[1]
    row_of = (lambda flat: int(rows[flat // k]) if rows is not None else flat // k)
    pos_of = (lambda r: int(rows[r]) if rows is not None else r)
    if kind == 0:
        flat = _first(flags[0])
        raise ValueError(f"teacher_ids must be < V = {vocab} (or negative for an empty slot); "
                         f"got {int(ids.reshape(-1)[flat])} at row {row_of(flat)}, slot "
                         f"{flat % k}")
    if kind == 1:
        flat = _first(flags[1])
        raise ValueError(f"teacher_logprobs must be finite in valid slots; got "
                         f"{float(lp.reshape(-1)[flat])} at row {row_of(flat)}, slot {flat % k}")
    if kind == 2:
        flat = _first(flags[2])
        raise ValueError(f"teacher_logprobs must be <= 0 (log-probs; tolerance {tol} for "
                         f"{lp.dtype}); got {float(lp.reshape(-1)[flat])} at row "
                         f"{row_of(flat)}, slot {flat % k}")
    if kind == 3:
        r = _first(flags[3])
        dup = ids[r][valid[r]]
        vals, counts = torch.unique(dup, return_counts=True)
        raise ValueError(f"teacher_ids must not repeat a valid id within a row; row "
                         f"{pos_of(r)} holds id {int(vals[counts > 1][0])} more than once")
    r = _first(flags[4])
    total = float(torch.where(valid[r], lp[r].double().exp(), 0.0).sum())
    raise ValueError(f"teacher_logprobs of a row must exp-sum to at most 1 (tolerance {tol} "
                     f"for {lp.dtype}); row {pos_of(r)} sums to {total:.6g}")


def prepare_teacher(ids: torch.Tensor, logprobs: torch.Tensor, rows: torch.Tensor | None,
                    vocab: int, spec: RowSpec) -> SparseTeacher:
    """Check the kept rows (``rows`` [kept] of the flat [N, K] inputs; None: all) and form the
    teacher tempered by ``spec``'s 1 / T. One host sync when every check passes."""
    if rows is not None:
        ids, logprobs = ids.index_select(0, rows), logprobs.index_select(0, rows)
    tol = LOGPROB_TOLERANCE[logprobs.dtype]
    ids64 = ids.long()
    valid = ids64 >= 0
    lp = logprobs.double()
    q = torch.where(valid, lp.exp(), torch.zeros_like(lp))
    ordered = torch.sort(torch.where(valid, ids64, torch.full_like(ids64, -1)), 1).values
    flags = (
        valid & (ids64 >= vocab),
        valid & ~torch.isfinite(lp),
        valid & (lp > tol),
        ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(1),
        q.sum(1) > 1.0 + tol,
    )
    counts = torch.stack([f.sum() for f in flags]).tolist()
    for kind, count in enumerate(counts):
        if count:
            _raise_bad(kind, ids64, logprobs, valid, rows, flags, vocab, tol)
    lp = torch.where(valid, lp.clamp(max=0.0), torch.full_like(lp, -math.inf))
    log_mass = torch.logsumexp(lp, 1)  # log Q (-inf for a row without valid ids)
    if spec.tempered:  # multiplied by 1 / T, as the kernels temper every logit
        scaled = lp * spec.inv_t
        lse = torch.logsumexp(scaled, 1, keepdim=True)
        safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        lp = torch.where(valid, log_mass[:, None] + scaled - safe, lp)
    rest = -torch.expm1(log_mass)  # 1 - Q without cancellation
    log_r = torch.log(rest.clamp(min=REST_EPS))
    outside = valid.sum(1) < vocab
    return SparseTeacher(torch.where(valid, ids64, torch.zeros_like(ids64)), valid, lp, log_r,
                         outside)
