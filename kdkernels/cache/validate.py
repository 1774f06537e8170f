"""Input checks for cache contents: every error names the argument and where it failed."""

from __future__ import annotations

import torch

from ..sparse.teacher import LOGPROB_TOLERANCE

INT32_MAX = 2**31 - 1
LOGPROB_TOL = 1e-3  # log-probs may exceed 0 by rounding (APIs print -0.0001 as 0.0001...)


def _where(mask: torch.Tensor) -> str:
    idx = mask.nonzero()[0].tolist()
    return f"sequence {idx[0]}, position {idx[1]}" + (f", slot {idx[2]}" if len(idx) > 2 else "")


def check_arrays(input_ids: torch.Tensor, teacher_ids: torch.Tensor,
                 teacher_logprobs: torch.Tensor, vocab_size: int | None = None) -> None:
    """Shapes [n, L], [n, L, K], [n, L, K]; ids integral and in range (negative teacher ids
    are empty slots); K <= vocab_size; valid log-probs finite and <= LOGPROB_TOL, their
    probabilities summing to at most 1 per position; no id twice in a position. The loss
    refuses what fails here, so a cache never holds targets it cannot train on."""
    for name, t in (("input_ids", input_ids), ("teacher_ids", teacher_ids),
                    ("teacher_logprobs", teacher_logprobs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [n, L]; got shape {list(input_ids.shape)}")
    n, L = input_ids.shape
    if teacher_ids.dim() != 3 or teacher_ids.shape[:2] != (n, L):
        raise ValueError(f"teacher_ids must be [n, L, K] = [{n}, {L}, K] like input_ids; got "
                         f"shape {list(teacher_ids.shape)}")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logprobs must have teacher_ids' shape "
                         f"{list(teacher_ids.shape)}; got {list(teacher_logprobs.shape)}")
    if teacher_ids.shape[2] < 1:
        raise ValueError("teacher_ids must have K >= 1 slots per position; got K = 0")
    for name, t in (("input_ids", input_ids), ("teacher_ids", teacher_ids)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor; got {t.dtype}")
    if not teacher_logprobs.dtype.is_floating_point:
        raise TypeError(f"teacher_logprobs must be a floating-point tensor; got "
                        f"{teacher_logprobs.dtype}")
    K = teacher_ids.shape[2]
    if vocab_size is not None and K > vocab_size:
        raise ValueError(f"teacher_ids holds K = {K} slots per position but vocab_size is "
                         f"{vocab_size}; K must be <= vocab_size (the loss refuses more)")
    if n == 0 or L == 0:
        return
    top = INT32_MAX if vocab_size is None else vocab_size - 1
    bad = (input_ids < 0) | (input_ids > top)
    if bad.any():
        raise ValueError(f"input_ids out of range [0, {top}] at {_where(bad)}: "
                         f"{input_ids[bad][0].item()}")
    bad = teacher_ids > top
    if bad.any():
        raise ValueError(f"teacher_ids out of range (valid ids are 0..{top}, negative = empty) "
                         f"at {_where(bad)}: {teacher_ids[bad][0].item()}")
    valid = teacher_ids >= 0
    lp = teacher_logprobs.float()
    bad = valid & ~torch.isfinite(lp)
    if bad.any():
        raise ValueError(f"teacher_logprobs not finite in a valid slot at {_where(bad)}: "
                         f"{lp[bad][0].item()}")
    bad = valid & (lp > LOGPROB_TOL)
    if bad.any():
        raise ValueError(f"teacher_logprobs must be log-probabilities (<= 0) in valid slots; "
                         f"{lp[bad][0].item()} at {_where(bad)}")
    # the loss's own bound on the mass of a position, for the dtype the log-probs come in
    tol = LOGPROB_TOLERANCE.get(teacher_logprobs.dtype, LOGPROB_TOLERANCE[torch.float32])
    mass = torch.where(valid, teacher_logprobs.double().exp(), 0.0).sum(-1)
    bad = mass > 1.0 + tol
    if bad.any():
        raise ValueError(f"teacher_logprobs of a position must exp-sum to at most 1 (tolerance "
                         f"{tol} for {teacher_logprobs.dtype}); {mass[bad][0].item():.6g} at "
                         f"{_where(bad)}")
    ids = torch.where(valid, teacher_ids.long(), -1).sort(dim=-1).values
    dup = ((ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] >= 0)).any(-1)
    if dup.any():
        raise ValueError(f"teacher_ids repeats an id within one position at {_where(dup)}")


def normalise(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty slots become id -1 with log-prob 0; ids int32, log-probs in the cache dtype."""
    empty = teacher_ids < 0
    ids = torch.where(empty, -1, teacher_ids.long()).to(torch.int32)
    lp = torch.where(empty, 0.0, teacher_logprobs.float()).to(dtype)
    return ids.contiguous(), lp.contiguous()
