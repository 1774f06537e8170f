"""Stats pass: per-row partial statistics (layouts.STATS) over one vocab split.

Grid (row blocks, vocab splits). Each program walks its split in BLOCK_V steps keeping the
online triples (max, sum exp, weighted sum exp) of docs/design.md in fp32 and writes one
[N_STATS] partial per row to part[split, row]; merge_kernel folds the splits with the same
rescale. The kernel knows no divergence: STATS_WEIGHT (the divergence's stats_weight) says
which weighted sum it keeps, so one compiled variant serves every divergence of that kind.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    N_STATS,
    S_E_A,
    S_M_A,
    S_M_B,
    S_M_Z,
    S_S_A,
    S_S_B,
    S_S_Z,
    S_W_A,
    S_W_B,
    S_Z_LABEL,
    WEIGHT_STUDENT,
    WEIGHT_TEACHER,
    helper,
    load_logits,
    softcap,
)

_NEG_INF = tl.constexpr(float("-inf"))


@helper
def _online_step(m, x):
    """New running max of rows x [R, B] (masked lanes -inf), the factor that rescales the old
    sums to it, and exp(x - max); an all -inf prefix keeps max -inf without NaN."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    finite = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - finite)
    e = tl.exp(x - finite[:, None])
    return m_new, alpha, e


@helper
def _entropy_step(ent, s, m_old, m_new, alpha, e, x):
    """The running sum exp(x - m) (x - m) moved to the new max (exp(m - m') (ent + (m - m') s),
    0 while everything was -inf) plus this tile's terms; lanes with e == 0 (masked, -inf,
    underflow) add 0. Called before s is rescaled."""
    shift = tl.where(m_old == float("-inf"), 0.0, m_old - m_new)
    finite = tl.where(m_new == float("-inf"), 0.0, m_new)
    return alpha * (ent + shift * s) + _weighted(e, x - finite[:, None])


@helper
def _weighted(e, d):
    # e * d with 0 where e == 0 (masked lanes, underflow, -inf logits), so 0 * inf is not NaN.
    return tl.sum(tl.where(e == 0.0, 0.0, e * d), axis=1)


@triton.jit
def stats_kernel(zs_ptr, zt_ptr, labels_ptr, part_ptr, n_rows, n_cols, stride_s, stride_t,
                 span, inv_t, cap_s, cap_t, scale_s, scale_t,
                 STATS_WEIGHT: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_V: tl.constexpr, HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
                 TEMPERED: tl.constexpr, SEPARATE_Z: tl.constexpr,
                 WANT_ENTROPY: tl.constexpr):
    """SEPARATE_Z: the untempered student gets its own (max, sum) (CE at T != 1); else
    m_z, s_z repeat m_a, s_a. WANT_ENTROPY: sum e_a, else leave it 0 (no work)."""
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    off_s = rows * stride_s
    off_t = rows * stride_t
    lo = split * span
    hi = tl.minimum(lo + span, n_cols)

    m_a = tl.full([BLOCK_R], _NEG_INF, tl.float32)
    m_b = tl.full([BLOCK_R], _NEG_INF, tl.float32)
    m_z = tl.full([BLOCK_R], _NEG_INF, tl.float32)
    s_a = tl.zeros([BLOCK_R], tl.float32)
    s_b = tl.zeros([BLOCK_R], tl.float32)
    s_z = tl.zeros([BLOCK_R], tl.float32)
    w_a = tl.zeros([BLOCK_R], tl.float32)
    w_b = tl.zeros([BLOCK_R], tl.float32)
    ent = tl.zeros([BLOCK_R], tl.float32)
    for start in range(lo, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < hi)[None, :]
        z, a = load_logits(zs_ptr, off_s, cols, mask, cap_s, inv_t, scale_s, HAS_CAP_S,
                           TEMPERED)
        _, b = load_logits(zt_ptr, off_t, cols, mask, cap_t, inv_t, scale_t, HAS_CAP_T,
                           TEMPERED)
        # max and exp see masked lanes as -inf (weight 0); the weighted sums use the finite
        # a, b, whose masked lanes get e = 0.
        m_prev = m_a
        m_a, alpha_a, e_a = _online_step(m_a, tl.where(mask, a, _NEG_INF))
        if WANT_ENTROPY:
            ent = _entropy_step(ent, s_a, m_prev, m_a, alpha_a, e_a, a)
        s_a = s_a * alpha_a + tl.sum(e_a, axis=1)
        if STATS_WEIGHT == WEIGHT_STUDENT:
            w_a = w_a * alpha_a + _weighted(e_a, a - b)
        m_b, alpha_b, e_b = _online_step(m_b, tl.where(mask, b, _NEG_INF))
        s_b = s_b * alpha_b + tl.sum(e_b, axis=1)
        if STATS_WEIGHT == WEIGHT_TEACHER:
            w_b = w_b * alpha_b + _weighted(e_b, b - a)
        if SEPARATE_Z:
            m_z, alpha_z, e_z = _online_step(m_z, tl.where(mask, z, _NEG_INF))
            s_z = s_z * alpha_z + tl.sum(e_z, axis=1)
    if not SEPARATE_Z:
        m_z = m_a
        s_z = s_a
    z_label = tl.zeros([BLOCK_R], tl.float32)
    if HAS_CE:
        label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        here = row_ok & (label >= lo) & (label < hi)
        z_label = tl.load(zs_ptr + off_s + tl.where(here, label, 0), mask=here,
                          other=0.0).to(tl.float32) * scale_s
        if HAS_CAP_S:
            z_label = softcap(z_label, cap_s)
        z_label = tl.where(here, z_label, 0.0)

    out = part_ptr + (split.to(tl.int64) * n_rows + rows) * N_STATS
    tl.store(out + S_M_A, m_a, mask=row_ok)
    tl.store(out + S_S_A, s_a, mask=row_ok)
    tl.store(out + S_W_A, w_a, mask=row_ok)
    tl.store(out + S_M_B, m_b, mask=row_ok)
    tl.store(out + S_S_B, s_b, mask=row_ok)
    tl.store(out + S_W_B, w_b, mask=row_ok)
    tl.store(out + S_M_Z, m_z, mask=row_ok)
    tl.store(out + S_S_Z, s_z, mask=row_ok)
    tl.store(out + S_Z_LABEL, z_label, mask=row_ok)
    tl.store(out + S_E_A, ent, mask=row_ok)


@helper
def merge_entropy(base, mask, out, row_ok, M_COL: tl.constexpr, S_COL: tl.constexpr,
                  E_COL: tl.constexpr):
    """Fold the x log x column E_COL (relative to the max M_COL, with the sum S_COL) over the
    split axis: sum exp(m - M) (e + (m - M) s), empty splits adding 0."""
    m = tl.load(base + M_COL, mask=mask, other=_NEG_INF)
    m_new = tl.max(m, axis=1)
    finite = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = tl.where(m == float("-inf"), 0.0, m - finite[:, None])
    s = tl.load(base + S_COL, mask=mask, other=0.0)
    e = tl.load(base + E_COL, mask=mask, other=0.0)
    tl.store(out + E_COL, tl.sum(tl.exp(shift) * (e + shift * s), axis=1), mask=row_ok)


@helper
def _merge_group(base, mask, out, row_ok, M_COL: tl.constexpr, C1: tl.constexpr,
                 C2: tl.constexpr, HAS_C2: tl.constexpr):
    """Fold the group (max M_COL, sums C1 and, if HAS_C2, C2) over the split axis."""
    m = tl.load(base + M_COL, mask=mask, other=_NEG_INF)
    m_new = tl.max(m, axis=1)
    finite = tl.where(m_new == float("-inf"), 0.0, m_new)
    factor = tl.exp(m - finite[:, None])  # 0 for empty or padded splits
    tl.store(out + M_COL, m_new, mask=row_ok)
    s1 = tl.load(base + C1, mask=mask, other=0.0)
    tl.store(out + C1, tl.sum(s1 * factor, axis=1), mask=row_ok)
    if HAS_C2:
        s2 = tl.load(base + C2, mask=mask, other=0.0)
        tl.store(out + C2, tl.sum(s2 * factor, axis=1), mask=row_ok)


@triton.jit
def merge_kernel(part_ptr, out_ptr, n_rows, n_parts, BLOCK_R: tl.constexpr,
                 BLOCK_P: tl.constexpr, WANT_ENTROPY: tl.constexpr):
    """out[row] = merge of part[0:n_parts, row] (row_stats.merge_partials in one launch);
    without WANT_ENTROPY e_a stays 0 (the rescale would move the partials' zeros)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    parts = tl.arange(0, BLOCK_P).to(tl.int64)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (parts < n_parts)[None, :]
    base = part_ptr + (parts[None, :] * n_rows + rows[:, None]) * N_STATS
    out = out_ptr + rows * N_STATS
    if WANT_ENTROPY:
        merge_entropy(base, mask, out, row_ok, S_M_A, S_S_A, S_E_A)  # reads the partial s_a
    else:
        tl.store(out + S_E_A, tl.zeros([BLOCK_R], tl.float32), mask=row_ok)
    _merge_group(base, mask, out, row_ok, S_M_A, S_S_A, S_W_A, True)
    _merge_group(base, mask, out, row_ok, S_M_B, S_S_B, S_W_B, True)
    _merge_group(base, mask, out, row_ok, S_M_Z, S_S_Z, S_S_Z, False)
    z_label = tl.load(base + S_Z_LABEL, mask=mask, other=0.0)
    tl.store(out + S_Z_LABEL, tl.sum(z_label, axis=1), mask=row_ok)
