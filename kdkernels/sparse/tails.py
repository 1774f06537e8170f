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

Under ``renormalize`` and ``bucket`` both distributions are fully known on their outcomes
(S, plus the rest for bucket), so every other divergence of the dense table is a function of
[C, K + 1] values too: jsd (beta), skew_forward_kl / skew_reverse_kl (skew), tvd and alpha
(alpha) take the generic rule below. With pi the student's outcome probabilities and
G_o = dD/dpi_o (up to a per-row constant, which cancels), dpi_o/da_j = pi_o (1[j in o] - p_j)
gives

    g_k = pi_k (G_k - Gbar) on S,  Gbar = sum_o pi_o G_o
    alpha = G_rest - Gbar          (bucket; renormalize has no rest: alpha = 0)

G is carried as (log|G|, sign): alpha's G_rest grows like 1 / pi_rest for the skew and alpha
divergences when the student is confident, and is formed in logs as forward KL's is.

A row whose S is the whole vocabulary has no rest outcome (its r is rounding): there the
bucket rule is the dense loss exactly. A row with no valid id has D = 0 and g = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
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
    """(log|x|, sign) with sign +1 at x = 0 (log|x| = -inf: a zero that adds nothing)."""
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


# ---- the generic rule of the other divergences (bucket and renormalize) ----

Params = Mapping[str, float]


class Outcomes(NamedTuple):
    lp: torch.Tensor  # [C, O] student log-probs of the outcomes, -inf where none
    lq: torch.Tensor  # [C, O] teacher log-probs of the outcomes
    valid: torch.Tensor  # [C, O] bool
    has_rest: bool  # the last column is the rest outcome (bucket)


def _bucket_outcomes(t: TailInputs) -> Outcomes:
    rest_lp = torch.where(t.outside, t.log1mp, torch.full_like(t.log1mp, -math.inf))
    return Outcomes(torch.cat([t.lp, rest_lp[:, None]], 1),
                    torch.cat([t.lq, t.log_r[:, None]], 1),
                    torch.cat([t.valid, t.outside[:, None]], 1), True)


def _renormalize_outcomes(t: TailInputs) -> Outcomes:
    return Outcomes(_renormalised(t.lp, t.valid), _renormalised(t.lq, t.valid), t.valid, False)


def _log_mixture(w_q: float, lq: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """log(w_q q + (1 - w_q) p) from the logs (a weight of 0 drops its side exactly)."""
    return torch.logaddexp(_log(w_q) + lq, _log(1.0 - w_q) + lp)


def _log(x: float) -> float:
    return math.log(x) if x > 0.0 else -math.inf


def _jsd(o: Outcomes, prm: Params):
    beta = prm["beta"]
    lm = _log_mixture(beta, o.lq, o.lp)
    div = (beta * _wsum(o.lq.exp(), o.lq - lm, _live(o.lq, o.valid))
           + (1.0 - beta) * _wsum(o.lp.exp(), o.lp - lm, _live(o.lp, o.valid)))
    log_g, sign = signed_log(o.lp - lm)  # G = (1 - beta) log(p / m)
    return div, log_g + math.log(1.0 - beta), sign


def _skew_forward_kl(o: Outcomes, prm: Params):
    lam = prm["skew"]
    lm = _log_mixture(lam, o.lq, o.lp)
    div = _wsum(o.lq.exp(), o.lq - lm, _live(o.lq, o.valid))
    # G = -(1 - skew) q / m, bounded by (1 - skew) / skew, in logs (skew 0: -q / p)
    return div, _log(1.0 - lam) + o.lq - lm, -torch.ones_like(lm)


def _skew_reverse_kl(o: Outcomes, prm: Params):
    lam = prm["skew"]
    lm = _log_mixture(1.0 - lam, o.lq, o.lp)
    div = _wsum(o.lp.exp(), o.lp - lm, _live(o.lp, o.valid))
    # G = log(p / m) + 1 - skew p / m; the constant 1 cancels against Gbar
    log_g, sign = signed_log((o.lp - lm) - lam * torch.exp(o.lp - lm))
    return div, log_g, sign


def _tvd(o: Outcomes, prm: Params):
    diff = torch.where(o.valid, o.lp.exp() - o.lq.exp(), torch.zeros_like(o.lp))
    log_g, sign = signed_log(0.5 * torch.sign(diff))  # G = 0.5 sign(p - q)
    return 0.5 * diff.abs().sum(1), log_g, sign


def _alpha(o: Outcomes, prm: Params):
    a = prm["alpha"]
    live = _live(o.lp, o.valid)
    # w = q^a p^(1-a) as one exp of log-probs; p itself where q == p (exact 0 at q = p)
    ratio = torch.where(o.lq == o.lp, torch.zeros_like(o.lp), o.lq - o.lp)
    w = torch.where(live, torch.exp(o.lp + a * ratio), torch.zeros_like(o.lp))
    p = _masked(o.lp.exp(), o.valid)
    q = _masked(o.lq.exp(), o.valid)
    div = _masked(p + a * (q - p) - w, o.valid).sum(1) / (a * (1.0 - a))
    # G = (1 - (q / p)^a) / a: the constant cancels, -(q / p)^a / a in logs
    return div, a * ratio - math.log(a), -torch.ones_like(ratio)


def _live(lx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Valid outcomes of non-zero probability (a zero one adds 0 log 0 = 0)."""
    return valid & ~torch.isneginf(lx)


def signed_sum(lx: torch.Tensor, sx: torch.Tensor, ly: torch.Tensor, sy: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log|x + y|, sign) of x = sx exp(lx) and y = sy exp(ly)."""
    same = sx == sy
    mag, sign = log_diff(lx, ly)
    return (torch.where(same, torch.logaddexp(lx, ly), mag),
            torch.where(same, sx, sx * sign))


def _generic(outcomes: Callable[[TailInputs], Outcomes],
             measure: Callable[[Outcomes, Params], tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]]
             ) -> Callable[[TailInputs, Params], TailResult]:
    def rule(t: TailInputs, prm: Params) -> TailResult:
        o = outcomes(t)
        div, log_g, sign = measure(o, prm)
        live = _live(o.lp, o.valid)
        pg = torch.where(live, sign * torch.exp(o.lp + log_g), torch.zeros_like(o.lp))
        g_bar = pg.sum(1)
        g = (pg - _masked(o.lp.exp(), live) * g_bar[:, None])[:, : t.lp.shape[1]]
        if not o.has_rest:
            return TailResult(div, g, *_no_alpha(t.log_r))
        log_bar, sign_bar = signed_log(-g_bar)
        log_alpha, sign_alpha = signed_sum(log_g[:, -1], sign[:, -1], log_bar, sign_bar)
        log_alpha = torch.where(live[:, -1], log_alpha, torch.full_like(log_alpha, -math.inf))
        return TailResult(div, g, log_alpha, sign_alpha)
    return rule


_MEASURES = {"jsd": _jsd, "skew_forward_kl": _skew_forward_kl,
             "skew_reverse_kl": _skew_reverse_kl, "tvd": _tvd, "alpha": _alpha}


def _kl_only(rule: Callable[[TailInputs], TailResult]
             ) -> Callable[[TailInputs, Params], TailResult]:
    return lambda t, prm: rule(t)


@dataclass(frozen=True)
class Tail:
    name: str
    rule: str  # what it does, for messages and the docs
    rules: dict[str, Callable[[TailInputs, Params], TailResult]]  # divergence -> math

    @property
    def divergences(self) -> tuple[str, ...]:
        return tuple(self.rules)


def _all(outcomes: Callable[[TailInputs], Outcomes], forward, reverse
         ) -> dict[str, Callable[[TailInputs, Params], TailResult]]:
    rules = {"forward_kl": _kl_only(forward), "reverse_kl": _kl_only(reverse)}
    rules.update({name: _generic(outcomes, m) for name, m in _MEASURES.items()})
    return rules


TABLE = (
    Tail("zero", "the teacher's K values as given, nothing outside them (the random-sampling "
         "KD estimator with sampled ids)", {"forward_kl": _kl_only(zero_forward)}),
    Tail("renormalize", "teacher and student both restricted to the K ids and renormalised",
         _all(_renormalize_outcomes, renormalize_forward, renormalize_reverse)),
    Tail("bucket", "K + 1 outcomes: the K ids and one bucket for the rest of the vocabulary",
         _all(_bucket_outcomes, bucket_forward, bucket_reverse)),
)
BY_NAME = {t.name: t for t in TABLE}
TAILS = tuple(BY_NAME)


def get(name: str) -> Tail:
    return BY_NAME[name]
