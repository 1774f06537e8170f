"""Per-row statistics of the row-op contract: their merge rule and final form.

A stats pass over a block of vocabulary columns returns, per row, fp32 partials in the
layout ``layouts.STATS`` that merge across vocab blocks or ranks with the online-softmax
rescale (docs/design.md): each max column rescales the sums that belong to it, ``z_label`` is a
plain sum. ``e_a`` = sum exp(a - m_a) (a - m_a) is relative to its max too, so moving it to a
larger max M adds the shift: e <- exp(m_a - M) (e + (m_a - M) s_a). Without
RowSpec.want_entropy the passes leave e_a at 0; merged, it is then finite but meaningless
(the shift moves it), and the rows report an entropy of 0 instead (dense/rows.py,
sparse/rows.py).
The mix pass returns the plain sums of ``layouts.MIX``, merged by addition.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .layouts import NORMS, SSTATS, STATS

# (max column, the sums rescaled with it, (sum, its x log x column) pairs), and the plain sums
_GROUPS = ((STATS.m_a, (STATS.s_a, STATS.w_a), ((STATS.s_a, STATS.e_a),)),
           (STATS.m_b, (STATS.s_b, STATS.w_b), ()), (STATS.m_z, (STATS.s_z,), ()))
_SUM_COLUMNS = (STATS.z_label,)


# Student-only stats (sparse teachers); every column after them is a plain sum (the
# student logits gathered at the teacher's ids, 0 on ranks that do not hold an id).
_STUDENT_GROUPS = ((SSTATS.m_a, (SSTATS.s_a,), ((SSTATS.s_a, SSTATS.e_a),)),
                   (SSTATS.m_z, (SSTATS.s_z,), ()))


def merge_partials(parts: torch.Tensor) -> torch.Tensor:
    """Merge partial stats [P, C, len(STATS)] (P vocab blocks or ranks) into [C, len(STATS)],
    deterministically."""
    return _merge(parts, _GROUPS, _SUM_COLUMNS)


def merge_student_partials(parts: torch.Tensor) -> torch.Tensor:
    """Merge [P, C, len(SSTATS) + extra] student-only partials, the extra columns summed in
    order (each is nonzero on one part at most, so the sum is exact)."""
    return _merge(parts, _STUDENT_GROUPS, range(len(SSTATS), parts.shape[-1]))


def _merge(parts: torch.Tensor, groups, sum_columns) -> torch.Tensor:
    if parts.shape[0] == 1:
        return parts[0]
    out = torch.empty_like(parts[0])
    for m_col, cols, shifted in groups:
        m = parts[:, :, m_col]
        m_new = m.amax(0)
        # A block with no columns has m = -inf and s = 0; keep its weight at 0, not NaN.
        safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        factor = torch.exp(m - safe)
        out[:, m_col] = m_new
        for c in cols:
            out[:, c] = (parts[:, :, c] * factor).sum(0)
        # An empty block (m = -inf, s = e = 0) adds 0: its shift would be -inf * 0.
        shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m - safe)
        for s_col, e_col in shifted:
            out[:, e_col] = ((parts[:, :, e_col] + shift * parts[:, :, s_col]) * factor).sum(0)
    for c in sum_columns:
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
    entropy: torch.Tensor  # of the tempered student softmax(a): log s_a - e_a / s_a


def finish(stats: torch.Tensor) -> RowTotals:
    col = {name: stats[:, i] for i, name in enumerate(STATS)}
    m_a, s_a, w_a, m_b, s_b, w_b = (col[k] for k in ("m_a", "s_a", "w_a", "m_b", "s_b", "w_b"))
    m_z, s_z, z_label, e_a = col["m_z"], col["s_z"], col["z_label"], col["e_a"]
    log_s_a, log_s_b, log_s_z = torch.log(s_a), torch.log(s_b), torch.log(s_z)
    return RowTotals(
        m_a=m_a, log_s_a=log_s_a, m_b=m_b, log_s_b=log_s_b, m_z=m_z, log_s_z=log_s_z,
        lse_gap=(m_b - m_a) + (log_s_b - log_s_a),
        mean_b_minus_a=w_b / s_b,
        mean_a_minus_b=w_a / s_a,
        z_label=z_label,
        entropy=log_s_a - e_a / s_a,
    )


def norms(totals: RowTotals) -> torch.Tensor:
    """[C, len(NORMS)]: the split log-normalisers the mix pass needs."""
    return torch.stack([getattr(totals, name) for name in NORMS], 1)
