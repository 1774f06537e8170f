"""Student-only row ops of the sparse-teacher losses (backends/base.py): per-row partial
(max, sum exp) of the student alone (layouts.SSTATS) and its gradient from the row
coefficients (layouts.SCOEF).

A column whose raw logit is -inf is masked: it stays -inf through the softcap (which would
make it -cap), adds nothing to the sums and gets exactly 0 in ``out``. The stats kernel walks
the same (row block, vocab split) grid as stats.py and its partials fold with the same
rescale (student_merge_kernel); the gradient kernel writes like grad.py, element for element
in place, into a 16-bit buffer, or packed over the fp32 rows (PACKED).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    N_SSTATS,
    SC_CE,
    SC_KD,
    SC_LOG_S_A,
    SC_LOG_S_Z,
    SC_M_A,
    SC_M_Z,
    SS_E_A,
    SS_M_A,
    SS_M_Z,
    SS_S_A,
    SS_S_Z,
    helper,
    softcap,
    store_grad,
)
from .stats import _entropy_step, _merge_group, _online_step, merge_entropy

_NEG_INF = tl.constexpr(float("-inf"))



@helper
def _load_student(ptr, row_off, cols, mask, cap, inv_t, scale, HAS_CAP: tl.constexpr,
                  TEMPERED: tl.constexpr):
    """(valid, capped z = softcap(scale * raw), tempered a) of a tile, fp32: valid is False
    on masked (-inf) columns and on lanes outside ``mask``, where z and a hold finite junk
    (the softcap sees 0 there, never -inf)."""
    raw = tl.load(ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    valid = mask & (raw != float("-inf"))
    z = tl.where(valid, raw, 0.0) * scale
    if HAS_CAP:
        z = softcap(z, cap)
    a = z
    if TEMPERED:
        a = z * inv_t
    return valid, z, a


@triton.jit
def student_stats_kernel(zs_ptr, part_ptr, n_rows, n_cols, stride_s, span, inv_t, cap_s,
                         scale_s, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                         HAS_CAP_S: tl.constexpr, TEMPERED: tl.constexpr,
                         SEPARATE_Z: tl.constexpr, WANT_ENTROPY: tl.constexpr):
    """Online (max, sum exp) of a = z * inv_t, and with SEPARATE_Z of the untempered z (else
    m_z, s_z repeat m_a, s_a), over the unmasked columns of one vocab split; a row with none
    gets (-inf, 0). With WANT_ENTROPY e_a too, else 0. One [N_SSTATS] partial per row to
    part[split, row]."""
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    off_s = rows * stride_s
    lo = split * span
    hi = tl.minimum(lo + span, n_cols)

    m_a = tl.full([BLOCK_R], _NEG_INF, tl.float32)
    m_z = tl.full([BLOCK_R], _NEG_INF, tl.float32)
    s_a = tl.zeros([BLOCK_R], tl.float32)
    s_z = tl.zeros([BLOCK_R], tl.float32)
    ent = tl.zeros([BLOCK_R], tl.float32)
    for start in range(lo, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < hi)[None, :]
        valid, z, a = _load_student(zs_ptr, off_s, cols, mask, cap_s, inv_t, scale_s,
                                    HAS_CAP_S, TEMPERED)
        m_prev = m_a
        m_a, alpha_a, e_a = _online_step(m_a, tl.where(valid, a, _NEG_INF))
        if WANT_ENTROPY:
            ent = _entropy_step(ent, s_a, m_prev, m_a, alpha_a, e_a, a)
        s_a = s_a * alpha_a + tl.sum(e_a, axis=1)
        if SEPARATE_Z:
            m_z, alpha_z, e_z = _online_step(m_z, tl.where(valid, z, _NEG_INF))
            s_z = s_z * alpha_z + tl.sum(e_z, axis=1)
    if not SEPARATE_Z:
        m_z = m_a
        s_z = s_a

    out = part_ptr + (split.to(tl.int64) * n_rows + rows) * N_SSTATS
    tl.store(out + SS_M_A, m_a, mask=row_ok)
    tl.store(out + SS_S_A, s_a, mask=row_ok)
    tl.store(out + SS_M_Z, m_z, mask=row_ok)
    tl.store(out + SS_S_Z, s_z, mask=row_ok)
    tl.store(out + SS_E_A, ent, mask=row_ok)


@triton.jit
def student_merge_kernel(part_ptr, out_ptr, n_rows, n_parts, BLOCK_R: tl.constexpr,
                         BLOCK_P: tl.constexpr, WANT_ENTROPY: tl.constexpr):
    """out[row] = merge of part[0:n_parts, row]: each (max, sum) pair rescaled to the row's
    max, as merge_kernel folds the stats partials (row_stats.merge_student_partials)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    parts = tl.arange(0, BLOCK_P).to(tl.int64)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (parts < n_parts)[None, :]
    base = part_ptr + (parts[None, :] * n_rows + rows[:, None]) * N_SSTATS
    out = out_ptr + rows * N_SSTATS
    if WANT_ENTROPY:
        merge_entropy(base, mask, out, row_ok, SS_M_A, SS_S_A, SS_E_A)  # reads partial s_a
    else:
        tl.store(out + SS_E_A, tl.zeros([BLOCK_R], tl.float32), mask=row_ok)
    _merge_group(base, mask, out, row_ok, SS_M_A, SS_S_A, SS_S_A, False)
    _merge_group(base, mask, out, row_ok, SS_M_Z, SS_S_Z, SS_S_Z, False)


@helper
def _student_grad_tile(zs_ptr, out_ptr, rows, row_ok, live, cols, n_cols, stride_s, stride_o,
                       m_a, log_s_a, m_z, log_s_z, kd, ce, label, inv_t, cap_s, scale_s,
                       HAS_CE: tl.constexpr, HAS_CAP_S: tl.constexpr, TEMPERED: tl.constexpr,
                       SEPARATE_Z: tl.constexpr, ROUND_BF16: tl.constexpr,
                       PACKED: tl.constexpr):
    col_ok = cols < n_cols
    mask = live[:, None] & col_ok[None, :]
    valid, z, a = _load_student(zs_ptr, rows * stride_s, cols, mask, cap_s, inv_t, scale_s,
                                HAS_CAP_S, TEMPERED)
    # Each term is selected, not multiplied, away where its coefficient is 0: its normaliser
    # may then be infinite (exp of +inf times 0 would be NaN).
    p = tl.exp((a - m_a[:, None]) - log_s_a[:, None])  # not a - lse: see backends/base.py
    dz = tl.where((kd != 0.0)[:, None], kd[:, None] * p, 0.0)
    if HAS_CE:
        ce_on = (ce != 0.0)[:, None]
        if SEPARATE_Z:
            p_z = tl.exp((z - m_z[:, None]) - log_s_z[:, None])
            dz += tl.where(ce_on, ce[:, None] * p_z, 0.0)
        hit = cols[None, :] == label[:, None]
        dz -= tl.where(hit & ce_on, ce[:, None], 0.0)
    # masked columns, dead rows and padding: exactly 0
    store_grad(dz, z, valid, cap_s, out_ptr, rows, cols, stride_o, row_ok, col_ok, HAS_CAP_S,
               ROUND_BF16, PACKED)


@triton.jit
def student_grad_kernel(zs_ptr, labels_ptr, coef_ptr, out_ptr, n_rows, n_cols, stride_s,
                        stride_o, stride_c, inv_t, cap_s, scale_s, HAS_CE: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                        HAS_CAP_S: tl.constexpr, TEMPERED: tl.constexpr,
                        SEPARATE_Z: tl.constexpr, ROUND_BF16: tl.constexpr,
                        PACKED: tl.constexpr):
    """out = kd softmax-like term of a, + (SEPARATE_Z) ce softmax of z, - ce at the label,
    times the softcap derivative (backends/base.py), 0 at masked columns and in rows with
    kd == ce == 0. ROUND_BF16 and PACKED as for grad_kernel: one program per row block
    walking the row front to back when ``out`` packs 16-bit values over fp32 zs rows, else
    one program per [BLOCK_R, BLOCK_V] tile."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    c = coef_ptr + rows * stride_c
    m_a = tl.load(c + SC_M_A, mask=row_ok, other=0.0)
    log_s_a = tl.load(c + SC_LOG_S_A, mask=row_ok, other=0.0)
    m_z = tl.load(c + SC_M_Z, mask=row_ok, other=0.0)
    log_s_z = tl.load(c + SC_LOG_S_Z, mask=row_ok, other=0.0)
    kd = tl.load(c + SC_KD, mask=row_ok, other=0.0)
    ce = tl.load(c + SC_CE, mask=row_ok, other=0.0)
    if not HAS_CE:
        ce = tl.zeros_like(ce)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    # Dead rows (ignored tokens) are not even read: their logits may be garbage.
    live = row_ok & ((kd != 0.0) | (ce != 0.0))
    if PACKED:
        for start in range(0, n_cols, BLOCK_V):
            _student_grad_tile(zs_ptr, out_ptr, rows, row_ok, live,
                               start + tl.arange(0, BLOCK_V), n_cols, stride_s, stride_o,
                               m_a, log_s_a, m_z, log_s_z, kd, ce, label, inv_t, cap_s,
                               scale_s, HAS_CE, HAS_CAP_S, TEMPERED, SEPARATE_Z, ROUND_BF16, PACKED)
    else:
        _student_grad_tile(zs_ptr, out_ptr, rows, row_ok, live,
                           tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V), n_cols,
                           stride_s, stride_o, m_a, log_s_a, m_z, log_s_z, kd, ce, label,
                           inv_t, cap_s, scale_s, HAS_CE, HAS_CAP_S, TEMPERED, SEPARATE_Z,
                           ROUND_BF16, PACKED)
