"""The divergences' element math for the Triton kernels (csrc/row_math.h is its C++ twin):
their DIV codes, taken from divergences.TABLE, the log-mixtures, and per element the two
mix-pass terms and the gradient G of backends/base.py. The kernels in mix.py and grad.py
only walk tiles and call these, so a new divergence touches this file alone here.
"""

from __future__ import annotations

import triton.language as tl

from ..divergences import BY_NAME, TABLE
from ..layouts import MIX_KINDS
from .common import helper

# DIV constexpr of the mix and gradient kernels.
FORWARD_KL = tl.constexpr(BY_NAME["forward_kl"].code)
REVERSE_KL = tl.constexpr(BY_NAME["reverse_kl"].code)
JSD = tl.constexpr(BY_NAME["jsd"].code)
SKEW_FORWARD_KL = tl.constexpr(BY_NAME["skew_forward_kl"].code)
SKEW_REVERSE_KL = tl.constexpr(BY_NAME["skew_reverse_kl"].code)
TVD = tl.constexpr(BY_NAME["tvd"].code)
ALPHA = tl.constexpr(BY_NAME["alpha"].code)
DIVERGENCE_CODES = {d.name: d.code for d in TABLE}

# MIX_KIND constexpr: which terms the log-mixture log(w_q q + (1 - w_q) p) has.
MIX_BOTH = tl.constexpr(MIX_KINDS.both)
MIX_ONLY_Q = tl.constexpr(MIX_KINDS.only_q)  # w_q == 1: log m = log q exactly
MIX_ONLY_P = tl.constexpr(MIX_KINDS.only_p)  # w_q == 0: log m = log p exactly



@helper
def _xlogy_diff(w, logx, logm):
    # w * (log x - log m) with 0 where w == 0 (masked lanes, underflow); NaN stays NaN.
    return tl.where(w == 0.0, 0.0, w * (logx - logm))


@helper
def _p_times(p, x):
    # p * x with 0 where p == 0 (underflow or -inf logit: x may be infinite there).
    return tl.where(p == 0.0, 0.0, p * x)


@helper
def log_mix(logq, logp, log_w_q, log_w_p, MIX_KIND: tl.constexpr):
    """log(w_q * q + (1 - w_q) * p) as a logaddexp of the log-probs, log_w_p = log(1 - w_q);
    exact when a weight is 0, -inf (not NaN) when both terms are."""
    if MIX_KIND == MIX_ONLY_Q:
        return logq
    elif MIX_KIND == MIX_ONLY_P:
        return logp
    else:
        x = logq + log_w_q
        y = logp + log_w_p
        hi = tl.maximum(x, y)
        lo = tl.minimum(x, y)
        finite_hi = tl.where(hi == float("-inf"), 0.0, hi)
        out = finite_hi + tl.log(1.0 + tl.exp(lo - finite_hi))
        out = tl.where(hi == float("-inf"), float("-inf"), out)
        # max/min return the other operand for a NaN (IEEE maxNum, on GPUs and in the
        # interpreter): put the NaN back so that NaN logits give a NaN loss.
        return tl.where((x != x) | (y != y), x + y, out)


@helper
def log_geo(logq, logp, w_q):
    """log(q^w_q p^(1 - w_q)) of the alpha divergence: log p itself where log q == log p
    (exact at q = p), else the weighted sum, which is -inf (not NaN) when either log-prob
    is -inf and NaN when either is NaN."""
    return tl.where(logq == logp, logp, w_q * logq + (1.0 - w_q) * logp)


@helper
def alpha_w_minus_p(logp, logq, p, w_q):
    """w - p of the alpha divergence without cancellation: p expm1(alpha (log q - log p))
    where that exponent is below 1 in magnitude (exactly 0 at q == p), else exp(log w) - p.
    expm1 by Kahan's identity (u - 1) x / log u, u = exp(x): Triton has no portable expm1."""
    x = w_q * (logq - logp)
    near = tl.abs(x) < 1.0
    xs = tl.where(near, x, 0.0)
    u = tl.exp(xs)
    em1 = tl.where(u == 1.0, xs, (u - 1.0) * xs / tl.log(u))
    return tl.where(near, p * em1, tl.exp(log_geo(logq, logp, w_q)) - p)


@helper
def mix_terms(logp, logq, w_q, log_w_q, log_w_p, DIV: tl.constexpr, MIX_KIND: tl.constexpr):
    """One element's contributions (t0, t1) to the two mix sums of divergences.py; masked
    lanes hold finite junk, which the caller masks out of its sums."""
    p = tl.exp(logp)
    q = tl.exp(logq)
    if DIV == TVD:
        diff = p - q
        t0 = 0.5 * tl.abs(diff)
        t1 = tl.where(diff > 0, 0.5 * p, tl.where(diff < 0, -0.5 * p, 0.0))
    elif DIV == ALPHA:
        t1 = tl.exp(log_geo(logq, logp, w_q))  # q^alpha p^(1-alpha), w_q = alpha
        # >= 0 (weighted AM-GM) and exactly 0 where q == p; 0 where p = q = 0
        t0 = p + w_q * (q - p) - t1
    else:
        logm = log_mix(logq, logp, log_w_q, log_w_p, MIX_KIND)
        if DIV == JSD:
            t0 = _xlogy_diff(q, logq, logm)
            t1 = _xlogy_diff(p, logp, logm)
        elif DIV == SKEW_FORWARD_KL:
            t0 = _xlogy_diff(q, logq, logm)
            t1 = tl.exp(logq + logp - logm)  # q p / m without dividing underflowed probs
        else:
            tl.static_assert(DIV == SKEW_REVERSE_KL)
            t0 = _xlogy_diff(p, logp, logm)
            if MIX_KIND == MIX_ONLY_Q:  # skew 0: the term is absent (p / q may overflow)
                t1 = tl.zeros_like(t0)
            else:
                t1 = tl.exp(log_w_p + 2.0 * logp - logm)  # skew p^2 / m <= p
    return t0, t1


@helper
def soft_grad(logp, logq, p, aux, w_q, log_w_q, log_w_p, k_div, DIV: tl.constexpr,
              MIX_KIND: tl.constexpr):
    """G of backends/base.py at one element (p = exp(logp), aux the row scalar [R, 1])."""
    if DIV == FORWARD_KL:
        g = p - tl.exp(logq)
    elif DIV == REVERSE_KL:
        g = _p_times(p, logp - logq - aux)
    elif DIV == TVD:
        diff = p - tl.exp(logq)
        half_sign = tl.where(diff > 0, 0.5, tl.where(diff < 0, -0.5, 0.0))
        g = p * (half_sign - aux)
    elif DIV == ALPHA:  # w_q = alpha, k_div = -1 / alpha, aux = c0 = 1 - sum w
        g = k_div * (alpha_w_minus_p(logp, logq, p, w_q) + p * aux)
    else:
        logm = log_mix(logq, logp, log_w_q, log_w_p, MIX_KIND)
        if DIV == JSD:
            g = k_div * _p_times(p, logp - logm - aux)
        elif DIV == SKEW_FORWARD_KL:
            g = k_div * (tl.exp(logp + logq - logm) - p * aux)
        else:
            tl.static_assert(DIV == SKEW_REVERSE_KL)
            g = _p_times(p, logp - logm - aux)
            if MIX_KIND != MIX_ONLY_Q:  # skew > 0: p / m <= 1 / skew, no overflow
                g -= tl.exp(log_w_p + 2.0 * logp - logm)  # skew p^2 / m <= p, log skew
    return g
