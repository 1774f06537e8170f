"""Per-row loss of each divergence from the merged row statistics (backend independent).

Each divergence also yields ``aux``, the one row scalar its gradient formula needs besides
the two log-normalisers (see backends/base.py for the element-wise gradient formulas):

    forward_kl       KL(q||p) = E_q[b-a] - (lse_b - lse_a)          aux = 0
    reverse_kl       KL(p||q) = E_p[a-b] + (lse_b - lse_a)          aux = KL(p||q)
    jsd (beta)       m = beta q + (1-beta) p;  beta KL(q||m) + (1-beta) KL(p||m)
                     mix = (sum q log(q/m), sum p log(p/m))          aux = sum p log(p/m)
    skew_forward_kl  mix_l = l q + (1-l) p;  KL(q||mix_l)
                     mix = (KL, sum q p / mix_l)                     aux = sum q p / mix_l
    skew_reverse_kl  mix_l = (1-l) q + l p;  KL(p||mix_l)
                     mix = (KL, sum l p^2 / mix_l)                   aux = KL - sum l p^2/mix_l
    tvd              0.5 sum |p - q|;  mix = (TVD, sum p g), g = 0.5 sign(p-q)   aux = sum p g
"""

from __future__ import annotations

import torch

from .options import KDOptions
from .row_stats import RowTotals

NEEDS_MIX = frozenset({"jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"})


def row_kd_and_aux(
    opts: KDOptions, totals: RowTotals, mix: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (divergence per row, aux per row), both fp32 [C]; the divergence is not scaled."""
    div = opts.effective_divergence
    if div == "forward_kl":
        kd = totals.mean_b_minus_a - totals.lse_gap
        aux = torch.zeros_like(kd)
    elif div == "reverse_kl":
        kd = totals.mean_a_minus_b + totals.lse_gap
        aux = kd
    else:
        assert mix is not None
        c0, c1 = mix.unbind(1)
        if div == "jsd":
            kd = opts.beta * c0 + (1.0 - opts.beta) * c1
            aux = c1
        elif div == "skew_reverse_kl":
            kd = c0
            aux = c0 - c1  # c1 already carries the skew weight (bounded by 1)
        else:  # skew_forward_kl, tvd
            kd = c0
            aux = c1
    # Every divergence is >= 0; fp32 cancellation can leave -1e-8. NaN passes through.
    return kd.clamp(min=0.0), aux
