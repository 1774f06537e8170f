"""Per-row statistics of the row-op contract: their layout, merge rule and final form.

A stats pass over a block of vocabulary columns returns, per row, fp32 partials that merge
across vocab blocks or ranks with the online-softmax rescale (DESIGN.md):

    col  name      meaning (a = z/T student, b = t/T teacher, z = student at T=1)
    0    m_a       max of a
    1    s_a       sum exp(a - m_a)
    2    w_a       sum exp(a - m_a) * (a - b)      (reverse KL only, else 0)
    3    m_b       max of b
    4    s_b       sum exp(b - m_b)
    5    w_b       sum exp(b - m_b) * (b - a)      (forward KL only, else 0)
    6    m_z       max of z                         (hard-label CE only, else = m_a)
    7    s_z       sum exp(z - m_z)                 (hard-label CE only, else = s_a)
    8    z_label   z at the row's label if the label is in this block, else 0 (plain sum)

The mix pass (JSD, skew KL, TVD) returns two plain sums per row, merged by addition.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

N_STATS = 9
N_MIX = 2
# (max column, columns rescaled with it)
_GROUPS = ((0, (1, 2)), (3, (4, 5)), (6, (7,)))
_SUM_COLUMNS = (8,)


def merge_partials(parts: torch.Tensor) -> torch.Tensor:
    """Merge partial stats [P, C, 9] (P vocab blocks or ranks) into [C, 9], deterministically."""
    if parts.shape[0] == 1:
        return parts[0]
    out = torch.empty_like(parts[0])
    for m_col, cols in _GROUPS:
        m = parts[:, :, m_col]
        m_new = m.amax(0)
        # A block with no columns has m = -inf and s = 0; keep its weight at 0, not NaN.
        safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        factor = torch.exp(m - safe)
        out[:, m_col] = m_new
        for c in cols:
            out[:, c] = (parts[:, :, c] * factor).sum(0)
    for c in _SUM_COLUMNS:
        out[:, c] = parts[:, :, c].sum(0)
    return out


class RowTotals(NamedTuple):
    """Finished per-row quantities derived from merged stats.

    Each log-normaliser is kept as (max, log of the shifted sum): in fp32, m + log s would
    round to ulp(|m|), and log p = (a - m) - log s keeps full precision for large logits.
    """

    m_a: torch.Tensor  # tempered student row: lse_a = m_a + log_s_a
    log_s_a: torch.Tensor
    m_b: torch.Tensor  # tempered teacher row
    log_s_b: torch.Tensor
    m_z: torch.Tensor  # untempered student row (hard-label CE)
    log_s_z: torch.Tensor
    lse_gap: torch.Tensor  # lse_b - lse_a, formed from the max gap first to avoid cancellation
    mean_b_minus_a: torch.Tensor  # E_q[b - a]
    mean_a_minus_b: torch.Tensor  # E_p[a - b]
    z_label: torch.Tensor


def finish(stats: torch.Tensor) -> RowTotals:
    m_a, s_a, w_a, m_b, s_b, w_b, m_z, s_z, z_label = stats.unbind(1)
    log_s_a, log_s_b, log_s_z = torch.log(s_a), torch.log(s_b), torch.log(s_z)
    return RowTotals(
        m_a=m_a, log_s_a=log_s_a, m_b=m_b, log_s_b=log_s_b, m_z=m_z, log_s_z=log_s_z,
        lse_gap=(m_b - m_a) + (log_s_b - log_s_a),
        mean_b_minus_a=w_b / s_b,
        mean_a_minus_b=w_a / s_a,
        z_label=z_label,
    )


def norms(totals: RowTotals) -> torch.Tensor:
    """[C, 4] (m_a, log_s_a, m_b, log_s_b): what the mix pass needs."""
    return torch.stack((totals.m_a, totals.log_s_a, totals.m_b, totals.log_s_b), 1)
