"""The divergence table: everything the package knows about a divergence, in one record.

Each record gives the divergence's name, its integer code (the ``DIV`` constexpr of the
Triton kernels and ``enum Div`` of ``csrc/row_math.h``, checked by tests/test_layouts.py),
the ``KDOptions`` fields that parameterise it, whether it needs the mix pass, which weighted
sum the stats pass keeps, its mixture weight and gradient constant (the row constants the
kernels take, computed once per call in ``RowSpec``), and the function from merged row
statistics to (divergence, aux) per row.

With p = softmax(a) the student and q = softmax(b) the teacher (both at temperature T),
the row scalar ``aux`` is what the element-wise gradient needs besides the log-normalisers
(the gradients G are listed below):

    forward_kl       KL(q||p) = E_q[b-a] - (lse_b - lse_a)          aux = 0
    reverse_kl       KL(p||q) = E_p[a-b] + (lse_b - lse_a)          aux = KL(p||q)
    jsd (beta)       m = beta q + (1-beta) p;  beta KL(q||m) + (1-beta) KL(p||m)
                     mix = (sum q log(q/m), sum p log(p/m))          aux = sum p log(p/m)
    skew_forward_kl  m = l q + (1-l) p;  KL(q||m)
                     mix = (KL, sum q p / m)                         aux = sum q p / m
    skew_reverse_kl  m = (1-l) q + l p;  KL(p||m)
                     mix = (KL, sum l p^2 / m)                       aux = KL - sum l p^2/m
    tvd              0.5 sum |p - q|;  mix = (TVD, sum p g), g = 0.5 sign(p-q)   aux = sum p g
    alpha (alpha)    (1 - sum q^alpha p^(1-alpha)) / (alpha (1 - alpha)), with
                     w = q^alpha p^(1-alpha) = exp(log p + alpha (log q - log p)):
                     mix = (sum p + alpha (q - p) - w, sum w)        aux = c0 (= 1 - sum w)
                     (the first sum has non-negative terms by weighted AM-GM and is exactly 0
                     when q = p, unlike 1 - sum w, which cancels to about eps)

The gradient with respect to the student logits (backends/base.py has the rest of the
formula: dz = kd * G + the CE term, times the softcap derivative; logm is the log of the
divergence's mixture w_q q + (1 - w_q) p) uses, for each divergence, G =

        forward_kl       p - q
        reverse_kl       p * (log p - log q - aux)
        jsd              k_div * p * (log p - logm - aux)                 k_div = 1 - beta
        skew_forward_kl  k_div * (exp(log p + log q - logm) - p * aux)    k_div = -(1 - skew)
                         (never p * (q / mix): q / mix overflows where p underflows)
        skew_reverse_kl  p * (log p - logm - aux) - exp(log_w_p + 2 log p - logm)
                         (skew p^2 / mix <= p, log_w_p = log skew; absent at skew 0)
        tvd              p * (0.5 * sign(p - q) - aux)
        alpha            k_div * ((w - p) + p * aux)                      k_div = -1 / alpha
                         (= k_div (w - p sum w)); w - p = p expm1(alpha (log q - log p))
                         where |alpha (log q - log p)| < 1, else exp(log w) - p with log w =
                         log p itself where log q == log p (-inf, not NaN, for -inf logits):
                         exactly 0 at q = p, where w - p sum w was eps / alpha

Adding a divergence: a row here, its element math in backends/torch_rows.py,
triton_kernels/row_math.py and csrc/row_math.h, and the float64 oracle (reference.py). A
new parameter adds a KDOptions field and the public signatures in api.py. Optionally, its
measure in sparse/tails.py (divergence and dD/dpi on the K + 1 outcomes) serves it under the
top-k tails bucket and renormalize; without one, those tails refuse it, naming their rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .layouts import MIX, MIX_KINDS, STATS_WEIGHTS
from .row_stats import RowTotals

RowLoss = Callable[[RowTotals, "torch.Tensor | None", Mapping[str, float]],
                   "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Divergence:
    name: str
    code: int
    params: tuple[str, ...]  # the KDOptions fields it reads
    needs_mix: bool
    stats_weight: str  # STATS_WEIGHTS: which weighted sum the stats pass keeps
    # (divergence per row, aux per row) from merged stats, the mix sums and the params
    row_loss: RowLoss
    # params -> (w_q, k_div): weight of q in the mixture, constant factor of the gradient
    mixture: Callable[[Mapping[str, float]], tuple[float, float]] = lambda p: (0.5, 1.0)
    # params -> the name of an exactly equal divergence, or None (jsd at beta 0 or 1)
    fold: Callable[[Mapping[str, float]], str | None] = lambda p: None


def _mix(mix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    assert mix is not None, "this divergence needs the mix pass"
    return mix[:, MIX.c0], mix[:, MIX.c1]


def _forward_kl(t: RowTotals, mix, p):
    kd = t.mean_b_minus_a - t.lse_gap
    return kd, torch.zeros_like(kd)


def _reverse_kl(t: RowTotals, mix, p):
    kd = t.mean_a_minus_b + t.lse_gap
    return kd, kd


def _jsd(t: RowTotals, mix, p):
    c0, c1 = _mix(mix)
    return p["beta"] * c0 + (1.0 - p["beta"]) * c1, c1


def _first_and_second(t: RowTotals, mix, p):  # skew_forward_kl, tvd
    return _mix(mix)


def _skew_reverse_kl(t: RowTotals, mix, p):
    c0, c1 = _mix(mix)
    return c0, c0 - c1  # c1 already carries the skew weight (bounded by 1)


def _alpha(t: RowTotals, mix, p):
    c0, _ = _mix(mix)
    a = p["alpha"]
    return c0 / (a * (1.0 - a)), c0


TABLE: tuple[Divergence, ...] = (
    Divergence("forward_kl", 0, (), False, "teacher", _forward_kl),
    Divergence("reverse_kl", 1, (), False, "student", _reverse_kl),
    Divergence("jsd", 2, ("beta",), True, "none", _jsd,
               mixture=lambda p: (p["beta"], 1.0 - p["beta"]),
               fold=lambda p: {0.0: "forward_kl", 1.0: "reverse_kl"}.get(p["beta"])),
    Divergence("skew_forward_kl", 3, ("skew",), True, "none", _first_and_second,
               mixture=lambda p: (p["skew"], -(1.0 - p["skew"]))),
    Divergence("skew_reverse_kl", 4, ("skew",), True, "none", _skew_reverse_kl,
               mixture=lambda p: (1.0 - p["skew"], 1.0)),
    Divergence("tvd", 5, (), True, "none", _first_and_second),
    Divergence("alpha", 6, ("alpha",), True, "none", _alpha,
               mixture=lambda p: (p["alpha"], -1.0 / p["alpha"])),
)

BY_NAME: dict[str, Divergence] = {d.name: d for d in TABLE}
NAMES: tuple[str, ...] = tuple(d.name for d in TABLE)
assert [d.code for d in TABLE] == list(range(len(TABLE))), "codes are the table order"
assert all(d.stats_weight in STATS_WEIGHTS for d in TABLE)


def get(name: str) -> Divergence:
    return BY_NAME[name]


def mixture_constants(w_q: float) -> dict[str, float]:
    """log-weights of the mixture w_q q + (1 - w_q) p and which of its terms exist (exact
    at weights 0 and 1: never log(0) arithmetic)."""
    kind = "only_q" if w_q == 1.0 else ("only_p" if w_q == 0.0 else "both")
    return dict(w_q=w_q, log_w_q=math.log(w_q) if w_q > 0 else 0.0,
                log_w_p=math.log1p(-w_q) if w_q < 1 else 0.0,
                mix_kind=float(getattr(MIX_KINDS, kind)))


def row_kd_and_aux(div: Divergence, totals: RowTotals, mix: torch.Tensor | None,
                   params: Mapping[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence per row, aux per row), both fp32 [C]; the divergence is not scaled."""
    kd, aux = div.row_loss(totals, mix, params)
    # Every divergence is >= 0; fp32 cancellation can leave -1e-8. NaN passes through.
    return kd.clamp(min=0.0), aux
