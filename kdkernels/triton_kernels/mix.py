"""Mix pass of the divergences that need one: the two plain row sums (layouts.MIX) per (row,
vocab split), given the full-row log-normalisers split as (max, log sum) (layouts.NORMS;
divergences.py says what the sums are)."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    MIX_C0,
    MIX_C1,
    N_MIX,
    NORM_LOG_S_A,
    NORM_LOG_S_B,
    NORM_M_A,
    NORM_M_B,
    load_logits,
)
from .row_math import mix_terms


@triton.jit
def mix_kernel(zs_ptr, zt_ptr, norms_ptr, part_ptr, n_rows, n_cols, stride_s, stride_t,
               stride_n, span, inv_t, cap_s, cap_t, scale_s, scale_t, w_q, log_w_q, log_w_p,
               DIV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
               HAS_CAP_S: tl.constexpr, HAS_CAP_T: tl.constexpr, TEMPERED: tl.constexpr,
               MIX_KIND: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    off_s = rows * stride_s
    off_t = rows * stride_t
    norms = norms_ptr + rows * stride_n
    m_a = tl.load(norms + NORM_M_A, mask=row_ok, other=0.0)[:, None]
    log_s_a = tl.load(norms + NORM_LOG_S_A, mask=row_ok, other=0.0)[:, None]
    m_b = tl.load(norms + NORM_M_B, mask=row_ok, other=0.0)[:, None]
    log_s_b = tl.load(norms + NORM_LOG_S_B, mask=row_ok, other=0.0)[:, None]
    lo = split * span
    hi = tl.minimum(lo + span, n_cols)
    acc0 = tl.zeros([BLOCK_R], tl.float32)
    acc1 = tl.zeros([BLOCK_R], tl.float32)
    for start in range(lo, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < hi)[None, :]
        _, a = load_logits(zs_ptr, off_s, cols, mask, cap_s, inv_t, scale_s, HAS_CAP_S,
                           TEMPERED)
        _, b = load_logits(zt_ptr, off_t, cols, mask, cap_t, inv_t, scale_t, HAS_CAP_T,
                           TEMPERED)
        logp = (a - m_a) - log_s_a  # not a - lse: see backends/base.py
        logq = (b - m_b) - log_s_b
        t0, t1 = mix_terms(logp, logq, w_q, log_w_q, log_w_p, DIV, MIX_KIND)
        acc0 += tl.sum(tl.where(mask, t0, 0.0), axis=1)  # masked lanes: finite junk
        acc1 += tl.sum(tl.where(mask, t1, 0.0), axis=1)
    out = part_ptr + (split.to(tl.int64) * n_rows + rows) * N_MIX
    tl.store(out + MIX_C0, acc0, mask=row_ok)
    tl.store(out + MIX_C1, acc1, mask=row_ok)
