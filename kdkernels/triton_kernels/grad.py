"""Gradient pass: dL/dz of the student (formulas in backends/base.py), stored in the dtype
of ``out``, which may alias the student logits element for element, or pack 16-bit values
over their fp32 rows (PACKED)."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    C_AUX,
    C_CE,
    C_KD,
    C_LOG_S_A,
    C_LOG_S_B,
    C_LOG_S_Z,
    C_M_A,
    C_M_B,
    C_M_Z,
    helper,
    load_logits,
    store_grad,
)
from .row_math import soft_grad


@helper
def _grad_tile(zs_ptr, zt_ptr, out_ptr, rows, row_ok, live, cols, n_cols, stride_s, stride_t,
               stride_o, m_a, log_s_a, m_b, log_s_b, aux, kd, ce, m_z, log_s_z, label, inv_t,
               cap_s, cap_t, scale_s, scale_t, w_q, log_w_q, log_w_p, k_div, DIV: tl.constexpr,
               HAS_CE: tl.constexpr, HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
               TEMPERED: tl.constexpr, MIX_KIND: tl.constexpr, ROUND_BF16: tl.constexpr,
               PACKED: tl.constexpr):
    col_ok = cols < n_cols
    mask = live[:, None] & col_ok[None, :]
    z, a = load_logits(zs_ptr, rows * stride_s, cols, mask, cap_s, inv_t, scale_s, HAS_CAP_S,
                       TEMPERED)
    _, b = load_logits(zt_ptr, rows * stride_t, cols, mask, cap_t, inv_t, scale_t, HAS_CAP_T,
                       TEMPERED)
    logp = (a - m_a[:, None]) - log_s_a[:, None]  # not a - lse: see backends/base.py
    logq = (b - m_b[:, None]) - log_s_b[:, None]
    p = tl.exp(logp)
    g = soft_grad(logp, logq, p, aux[:, None], w_q, log_w_q, log_w_p, k_div, DIV, MIX_KIND)
    dz = kd[:, None] * g
    if HAS_CE:
        if TEMPERED:
            p_z = tl.exp((z - m_z[:, None]) - log_s_z[:, None])
        else:  # z == a: reuse p, rescaled by a row factor (exactly 1 when the stats agree)
            p_z = p * tl.exp((m_a - m_z) + (log_s_a - log_s_z))[:, None]
        hit = cols[None, :] == label[:, None]
        dz += ce[:, None] * (p_z - tl.where(hit, 1.0, 0.0))
    store_grad(dz, z, mask, cap_s, out_ptr, rows, cols, stride_o, row_ok, col_ok, HAS_CAP_S,
               ROUND_BF16, PACKED)


@triton.jit
def grad_kernel(zs_ptr, zt_ptr, labels_ptr, coef_ptr, out_ptr, n_rows, n_cols, stride_s,
                stride_t, stride_o, stride_c, inv_t, cap_s, cap_t, scale_s, scale_t, w_q,
                log_w_q, log_w_p, k_div, DIV: tl.constexpr, HAS_CE: tl.constexpr,
                BLOCK_R: tl.constexpr,
                BLOCK_V: tl.constexpr, HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr,
                TEMPERED: tl.constexpr, MIX_KIND: tl.constexpr, ROUND_BF16: tl.constexpr,
                PACKED: tl.constexpr):
    """The row constants are RowSpec.consts by name (k_div the full constant factor of G).
    ROUND_BF16: round to nearest even by hand before a bf16 store (interpreter only).
    PACKED: ``out`` is 16-bit and overlays the first half of each fp32 zs row (its row
    stride is twice zs's in elements); one program per row block then walks the whole row
    front to back, else one program per [BLOCK_R, BLOCK_V] tile."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    c = coef_ptr + rows * stride_c
    m_a = tl.load(c + C_M_A, mask=row_ok, other=0.0)
    log_s_a = tl.load(c + C_LOG_S_A, mask=row_ok, other=0.0)
    m_b = tl.load(c + C_M_B, mask=row_ok, other=0.0)
    log_s_b = tl.load(c + C_LOG_S_B, mask=row_ok, other=0.0)
    m_z = tl.load(c + C_M_Z, mask=row_ok, other=0.0)
    log_s_z = tl.load(c + C_LOG_S_Z, mask=row_ok, other=0.0)
    aux = tl.load(c + C_AUX, mask=row_ok, other=0.0)
    kd = tl.load(c + C_KD, mask=row_ok, other=0.0)
    ce = tl.load(c + C_CE, mask=row_ok, other=0.0)
    label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    # Dead rows (ignored tokens) are not even read: their logits may be garbage.
    live = row_ok & ((kd != 0.0) | (ce != 0.0))
    if PACKED:
        for start in range(0, n_cols, BLOCK_V):
            _grad_tile(zs_ptr, zt_ptr, out_ptr, rows, row_ok, live,
                       start + tl.arange(0, BLOCK_V), n_cols, stride_s, stride_t, stride_o,
                       m_a, log_s_a, m_b, log_s_b, aux, kd, ce, m_z, log_s_z, label, inv_t,
                       cap_s, cap_t, scale_s, scale_t, w_q, log_w_q, log_w_p, k_div, DIV,
                       HAS_CE, HAS_CAP_S,
                       HAS_CAP_T, TEMPERED, MIX_KIND, ROUND_BF16, PACKED)
    else:
        _grad_tile(zs_ptr, zt_ptr, out_ptr, rows, row_ok, live,
                   tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V), n_cols, stride_s,
                   stride_t, stride_o, m_a, log_s_a, m_b, log_s_b, aux, kd, ce, m_z, log_s_z,
                   label, inv_t, cap_s, cap_t, scale_s, scale_t, w_q, log_w_q, log_w_p, k_div,
                   DIV, HAS_CE,
                   HAS_CAP_S, HAS_CAP_T, TEMPERED, MIX_KIND, ROUND_BF16, PACKED)
