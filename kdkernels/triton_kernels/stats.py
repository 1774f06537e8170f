"""Stats pass: per-row partial statistics (row_stats.py layout) over one vocab split.

Grid (row blocks, vocab splits). Each program walks its split in BLOCK_V steps keeping the
online triples (max, sum exp, weighted sum exp) of DESIGN.md in fp32 and writes one [9]
partial per row to part[split, row]; merge_kernel folds the splits with the same rescale.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import FORWARD_KL, REVERSE_KL, helper, load_logits, softcap

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
def _weighted(e, d):
    # e * d with 0 where e == 0 (masked lanes, underflow, -inf logits), so 0 * inf is not NaN.
    return tl.sum(tl.where(e == 0.0, 0.0, e * d), axis=1)


@triton.heuristics({
    "HAS_CAP_S": lambda a: a["cap_s"] > 0,
    "HAS_CAP_T": lambda a: a["cap_t"] > 0,
    "TEMPERED": lambda a: a["inv_t"] != 1.0,
    # The untempered student needs its own logsumexp only for CE at T != 1.
    "SEPARATE_Z": lambda a: bool(a["HAS_CE"]) and a["inv_t"] != 1.0,
})
@triton.jit
def stats_kernel(zs_ptr, zt_ptr, labels_ptr, part_ptr, n_rows, n_cols, stride_s, stride_t,
                 span, inv_t, cap_s, cap_t,
                 DIV: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_V: tl.constexpr, HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
                 TEMPERED: tl.constexpr, SEPARATE_Z: tl.constexpr):
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
    for start in range(lo, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < hi)[None, :]
        z, a = load_logits(zs_ptr, off_s, cols, mask, cap_s, inv_t, HAS_CAP_S, TEMPERED)
        _, b = load_logits(zt_ptr, off_t, cols, mask, cap_t, inv_t, HAS_CAP_T, TEMPERED)
        # max and exp see masked lanes as -inf (weight 0); the weighted sums use the finite
        # a, b, whose masked lanes get e = 0.
        m_a, alpha_a, e_a = _online_step(m_a, tl.where(mask, a, _NEG_INF))
        s_a = s_a * alpha_a + tl.sum(e_a, axis=1)
        if DIV == REVERSE_KL:
            w_a = w_a * alpha_a + _weighted(e_a, a - b)
        m_b, alpha_b, e_b = _online_step(m_b, tl.where(mask, b, _NEG_INF))
        s_b = s_b * alpha_b + tl.sum(e_b, axis=1)
        if DIV == FORWARD_KL:
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
                          other=0.0).to(tl.float32)
        if HAS_CAP_S:
            z_label = softcap(z_label, cap_s)
        z_label = tl.where(here, z_label, 0.0)

    out = part_ptr + (split.to(tl.int64) * n_rows + rows) * 9
    tl.store(out + 0, m_a, mask=row_ok)
    tl.store(out + 1, s_a, mask=row_ok)
    tl.store(out + 2, w_a, mask=row_ok)
    tl.store(out + 3, m_b, mask=row_ok)
    tl.store(out + 4, s_b, mask=row_ok)
    tl.store(out + 5, w_b, mask=row_ok)
    tl.store(out + 6, m_z, mask=row_ok)
    tl.store(out + 7, s_z, mask=row_ok)
    tl.store(out + 8, z_label, mask=row_ok)


@helper
def _merge_group(base, mask, out, row_ok, M_COL: tl.constexpr, C1: tl.constexpr,
                 C2: tl.constexpr):
    """Fold the (max, sums...) group at M_COL over the split axis; C2 < 0 means none."""
    m = tl.load(base + M_COL, mask=mask, other=_NEG_INF)
    m_new = tl.max(m, axis=1)
    finite = tl.where(m_new == float("-inf"), 0.0, m_new)
    factor = tl.exp(m - finite[:, None])  # 0 for empty or padded splits
    tl.store(out + M_COL, m_new, mask=row_ok)
    s1 = tl.load(base + C1, mask=mask, other=0.0)
    tl.store(out + C1, tl.sum(s1 * factor, axis=1), mask=row_ok)
    if C2 >= 0:
        s2 = tl.load(base + C2, mask=mask, other=0.0)
        tl.store(out + C2, tl.sum(s2 * factor, axis=1), mask=row_ok)


@triton.jit
def merge_kernel(part_ptr, out_ptr, n_rows, n_parts, BLOCK_R: tl.constexpr,
                 BLOCK_P: tl.constexpr):
    """out[row] = merge of part[0:n_parts, row] (row_stats.merge_partials in one launch)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    parts = tl.arange(0, BLOCK_P).to(tl.int64)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (parts < n_parts)[None, :]
    base = part_ptr + (parts[None, :] * n_rows + rows[:, None]) * 9
    out = out_ptr + rows * 9
    _merge_group(base, mask, out, row_ok, 0, 1, 2)
    _merge_group(base, mask, out, row_ok, 3, 4, 5)
    _merge_group(base, mask, out, row_ok, 6, 7, -1)
    z_label = tl.load(base + 8, mask=mask, other=0.0)
    tl.store(out + 8, tl.sum(z_label, axis=1), mask=row_ok)
