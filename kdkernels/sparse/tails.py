"""The tail rules of the sparse-teacher loss: what the teacher's missing mass means.

For a row, S is the set of valid teacher ids, ``lq`` the tempered teacher log-probs on S
(they keep the covered mass Q, teacher.py), ``lp`` the student's full-vocabulary log-probs
log p_k = a_k - lse(a) on S, ``log1mp`` = log(1 - P) the log of the student's mass outside
S and ``log_r`` the log of the teacher's rest r = 1 - Q (clamped below at REST_EPS).

Each rule returns, per row, the divergence, ``g`` = dL/da_k on S, and the coefficient
alpha of the gradient outside S, dL/da_j = alpha * p_j (j not in S), as (log|alpha|, sign)
so that the kernels can fold it into the softmax normaliser (no overflow when 1 - P is
tiny and alpha huge). All of it runs on [C, K] tensors in float64.

    zero         teacher as given, nothing outside S; forward KL only:
                 D = sum_S q (log q - log p);  g = Q p - q;  alpha = Q
    renormalize  both restricted to S and renormalised, q / Q vs p / P:
                 forward  D = sum_S q' (log q' - log p');  g = p' - q';  alpha = 0
                 reverse  D = sum_S p' (log p' - log q');  g = p' (u - D), u = log p' - log q'
    bucket       K + 1 outcomes: S and the rest (r for the teacher, 1 - P for the student):
                 forward  D = sum_S q (log q - log p) + r (log r - log(1 - P))
                          g = (Q + r) p - q;  alpha = (Q + r) - r / (1 - P)
                 reverse  D = sum_S p u + (1 - P) u_out, u = log p - log q,
                          u_out = log(1 - P) - log r;  g = p (u - D);  alpha = u_out - D

A row whose S is the whole vocabulary has no rest outcome (its r is rounding): there the
bucket rule is the dense loss exactly. A row with no valid id has D = 0 and g = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

# The teacher's rest mass is clamped below at this when Q >= 1 - REST_EPS (rounding of the
# served log-probs). Forward KL then gives the rest a weight of 1e-6 (a negligible term);
# reverse KL's rest term (1 - P) log((1 - P) / r) becomes a finite penalty of at most
# (1 - P) * log(1e6) ~ 13.8 (1 - P) instead of infinity, pushing the student's mass into S.
REST_EPS = 1e-6


class TailInputs(NamedTuple):
    lp: torch.Tensor  # [C, K] student log p on S, -inf at empty slots
    lq: torch.Tensor  # [C, K] tempered teacher log q on S, -inf at empty slots
    valid: torch.Tensor  # [C, K] bool
    log1mp: torch.Tensor  # [C] log of the student's mass outside S (-inf: none)
    log_r: torch.Tensor  # [C] log of the teacher's (clamped) rest
    outside: torch.Tensor  # [C] bool: S is not the whole vocabulary


class TailResult(NamedTuple):
    div: torch.Tensor  # [C] the divergence
    g: torch.Tensor  # [C, K] dL/da on S, 0 at empty slots
    log_alpha: torch.Tensor  # [C] log|alpha|, -inf for alpha = 0
    sign_alpha: torch.Tensor  # [C] +1 or -1


def _wsum(w: torch.Tensor, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Row sums of w * x over the valid slots (0 * inf at empty slots never enters)."""
    return torch.where(valid, w * x, torch.zeros_like(w)).sum(1)


def _masked(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def signed_log(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.log(x.abs()), torch.where(x < 0, -1.0, 1.0).to(x.dtype)


def log_diff(log_a: torch.Tensor, log_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log|A - B|, sign(A - B)) from log A and log B, without forming A or B."""
    a_big = log_a >= log_b
    hi = torch.where(a_big, log_a, log_b)
    lo = torch.where(a_big, log_b, log_a)
    gap = torch.where(torch.isneginf(hi), torch.full_like(hi, -math.inf), lo - hi)
    out = hi + log1mexp(gap.clamp(max=0.0))
    return out, torch.where(a_big, 1.0, -1.0).to(log_a.dtype)


def _no_alpha(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full_like(like, -math.inf), torch.ones_like(like)


def _renormalised(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    lse = torch.logsumexp(x, 1, keepdim=True)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return torch.where(valid, x - safe, torch.full_like(x, -math.inf))


def zero_forward(t: TailInputs) -> TailResult:
    q, p = _masked(t.lq.exp(), t.valid), _masked(t.lp.exp(), t.valid)
    mass = q.sum(1)
    div = _wsum(q, t.lq - t.lp, t.valid)
    g = _masked(mass[:, None] * p - q, t.valid)
    return TailResult(div, g, torch.log(mass), torch.ones_like(mass))


def renormalize_forward(t: TailInputs) -> TailResult:
    lpr, lqr = _renormalised(t.lp, t.valid), _renormalised(t.lq, t.valid)
    pr, qr = _masked(lpr.exp(), t.valid), _masked(lqr.exp(), t.valid)
    return TailResult(_wsum(qr, lqr - lpr, t.valid), pr - qr, *_no_alpha(t.log_r))


def renormalize_reverse(t: TailInputs) -> TailResult:
    lpr, lqr = _renormalised(t.lp, t.valid), _renormalised(t.lq, t.valid)
    pr = _masked(lpr.exp(), t.valid)
    u = _masked(lpr - lqr, t.valid)
    div = _wsum(pr, u, t.valid)
    return TailResult(div, pr * (u - div[:, None]), *_no_alpha(t.log_r))


def _rest(t: TailInputs) -> torch.Tensor:
    return torch.where(t.outside, t.log_r.exp(), torch.zeros_like(t.log_r))


def bucket_forward(t: TailInputs) -> TailResult:
    q, p = _masked(t.lq.exp(), t.valid), _masked(t.lp.exp(), t.valid)
    r = _rest(t)
    total = q.sum(1) + r
    rest_term = torch.where(t.outside, r * (t.log_r - t.log1mp), torch.zeros_like(r))
    div = _wsum(q, t.lq - t.lp, t.valid) + rest_term
    g = _masked(total[:, None] * p - q, t.valid)
    # alpha = (Q + r) - r / (1 - P), as logs: r / (1 - P) overflows for a confident student.
    log_b = torch.where(t.outside, t.log_r - t.log1mp, torch.full_like(r, -math.inf))
    log_alpha, sign = log_diff(torch.log(total), log_b)
    return TailResult(div, g, log_alpha, sign)


def bucket_reverse(t: TailInputs) -> TailResult:
    p = _masked(t.lp.exp(), t.valid)
    u = _masked(t.lp - t.lq, t.valid)
    u_out = torch.where(t.outside, t.log1mp - t.log_r, torch.zeros_like(t.log_r))
    rest_term = torch.where(t.outside, t.log1mp.exp() * u_out, torch.zeros_like(u_out))
    div = _wsum(p, u, t.valid) + rest_term
    g = p * (u - div[:, None])
    log_alpha, sign = signed_log(u_out - div)
    log_alpha = torch.where(t.outside, log_alpha, torch.full_like(log_alpha, -math.inf))
    return TailResult(div, g, log_alpha, sign)


@dataclass(frozen=True)
class Tail:
    name: str
    rule: str  # what it does, for messages and the README
    rules: dict[str, Callable[[TailInputs], TailResult]]  # divergence -> math

    @property
    def divergences(self) -> tuple[str, ...]:
        return tuple(self.rules)


TABLE = (
    Tail("zero", "the teacher's K values as given, nothing outside them (the random-sampling "
         "KD estimator with sampled ids)", {"forward_kl": zero_forward}),
    Tail("renormalize", "teacher and student both restricted to the K ids and renormalised",
         {"forward_kl": renormalize_forward, "reverse_kl": renormalize_reverse}),
    Tail("bucket", "K + 1 outcomes: the K ids and one bucket for the rest of the vocabulary",
         {"forward_kl": bucket_forward, "reverse_kl": bucket_reverse}),
)
BY_NAME = {t.name: t for t in TABLE}
TAILS = tuple(BY_NAME)


def get(name: str) -> Tail:
    return BY_NAME[name]
