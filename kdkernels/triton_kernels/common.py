"""Helpers shared by the row kernels (loading, softcap, rounding) and the constexpr names
they share: the column indices of the row-op layouts (layouts.py) and the stats-weight
flags (STATS_WEIGHTS). The divergences' own element math and codes are in row_math.py.

Triton kernels can read only tl.constexpr globals, so each index is one here, taken from
the Python tables at import: the kernels hold no integer column index or code of their own.

Only tl core ops are used (no libdevice): the same code runs compiled and under the CPU
interpreter, which does not patch libdevice.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ..layouts import COEF, MIX, NORMS, SCOEF, SSTATS, STATS, STATS_WEIGHTS

# Helpers called from kernels. Under the CPU interpreter each nested @triton.jit call
# re-patches triton.language (~5 ms, most of a small launch), so there they are plain
# Python functions run inside the caller's patched scope; compiled, they are @triton.jit.
helper = (lambda fn: fn) if os.environ.get("TRITON_INTERPRET", "0") == "1" else triton.jit

# STATS_WEIGHT constexpr of the stats kernel: which weighted sum it keeps.
WEIGHT_NONE = tl.constexpr(STATS_WEIGHTS.none)
WEIGHT_STUDENT = tl.constexpr(STATS_WEIGHTS.student)  # w_a
WEIGHT_TEACHER = tl.constexpr(STATS_WEIGHTS.teacher)  # w_b

# Columns of the stats partials (layouts.STATS) and their count, the row stride.
S_M_A = tl.constexpr(STATS.m_a)
S_S_A = tl.constexpr(STATS.s_a)
S_W_A = tl.constexpr(STATS.w_a)
S_M_B = tl.constexpr(STATS.m_b)
S_S_B = tl.constexpr(STATS.s_b)
S_W_B = tl.constexpr(STATS.w_b)
S_M_Z = tl.constexpr(STATS.m_z)
S_S_Z = tl.constexpr(STATS.s_z)
S_Z_LABEL = tl.constexpr(STATS.z_label)
S_E_A = tl.constexpr(STATS.e_a)
N_STATS = tl.constexpr(len(STATS))

# The mix sums (layouts.MIX).
MIX_C0 = tl.constexpr(MIX.c0)
MIX_C1 = tl.constexpr(MIX.c1)
N_MIX = tl.constexpr(len(MIX))

# The mix pass's full-row log-normalisers (layouts.NORMS).
NORM_M_A = tl.constexpr(NORMS.m_a)
NORM_LOG_S_A = tl.constexpr(NORMS.log_s_a)
NORM_M_B = tl.constexpr(NORMS.m_b)
NORM_LOG_S_B = tl.constexpr(NORMS.log_s_b)

# The gradient pass's row coefficients (layouts.COEF).
C_M_A = tl.constexpr(COEF.m_a)
C_LOG_S_A = tl.constexpr(COEF.log_s_a)
C_M_B = tl.constexpr(COEF.m_b)
C_LOG_S_B = tl.constexpr(COEF.log_s_b)
C_M_Z = tl.constexpr(COEF.m_z)
C_LOG_S_Z = tl.constexpr(COEF.log_s_z)
C_AUX = tl.constexpr(COEF.aux)
C_KD = tl.constexpr(COEF.kd)
C_CE = tl.constexpr(COEF.ce)

# Columns of the student partials (layouts.SSTATS) and their count, the row stride.
SS_M_A = tl.constexpr(SSTATS.m_a)
SS_S_A = tl.constexpr(SSTATS.s_a)
SS_M_Z = tl.constexpr(SSTATS.m_z)
SS_S_Z = tl.constexpr(SSTATS.s_z)
SS_E_A = tl.constexpr(SSTATS.e_a)
N_SSTATS = tl.constexpr(len(SSTATS))

# The student gradient's row coefficients (layouts.SCOEF).
SC_M_A = tl.constexpr(SCOEF.m_a)
SC_LOG_S_A = tl.constexpr(SCOEF.log_s_a)
SC_M_Z = tl.constexpr(SCOEF.m_z)
SC_LOG_S_Z = tl.constexpr(SCOEF.log_s_z)
SC_KD = tl.constexpr(SCOEF.kd)
SC_CE = tl.constexpr(SCOEF.ce)


@helper
def softcap(x, cap):
    """cap * tanh(x / cap). tanh from one exp of -2|y| (never overflows); below |y| = 1/16 a
    Taylor polynomial instead, where 1 - exp(-2|y|) would cancel (relative error < 4e-9)."""
    y = x / cap
    ay = tl.abs(y)
    e = tl.exp(-2.0 * ay)
    t_big = (1.0 - e) / (1.0 + e)
    y2 = ay * ay
    t_small = ay * (1.0 - y2 * (1.0 / 3.0 - y2 * (2.0 / 15.0)))
    t = tl.where(ay < 0.0625, t_small, t_big)
    return cap * tl.where(y < 0, -t, t)


@helper
def load_logits(ptr, row_off, cols, mask, cap, inv_t, scale, HAS_CAP: tl.constexpr,
                TEMPERED: tl.constexpr):
    """(capped scaled logits z = softcap(scale * raw), tempered logits z * inv_t) of a tile,
    fp32 (a scale of 1 multiplies exactly). Masked lanes hold finite junk (0): callers mask
    what they reduce (no -inf - -inf on dead lanes)."""
    z = tl.load(ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = z * scale
    if HAS_CAP:
        z = softcap(z, cap)
    x = z
    if TEMPERED:
        x = z * inv_t
    return z, x


@helper
def round_to_bf16(x):
    """fp32 -> fp32 holding the round-to-nearest-even bf16 value. Only for the interpreter,
    whose fp32 -> bf16 cast truncates (compiled Triton rounds to nearest even itself)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@helper
def store_grad(dz, z, keep, cap_s, out_ptr, rows, cols, stride_o, row_ok, col_ok,
               HAS_CAP_S: tl.constexpr, ROUND_BF16: tl.constexpr, PACKED: tl.constexpr):
    """Store a gradient tile: dz times the softcap derivative at the capped logits z, 0
    outside ``keep``, in out's dtype."""
    if HAS_CAP_S:
        r = z / cap_s
        dz *= 1.0 - r * r
    dz = tl.where(keep, dz, 0.0)
    if ROUND_BF16:
        dz = round_to_bf16(dz)
    if PACKED:
        # These stores land on zs columns below (tile end) / 2, which every thread of the
        # program has loaded by now, in this tile or an earlier one: wait for all of them.
        tl.debug_barrier()
    out = out_ptr + rows[:, None] * stride_o + cols[None, :]
    tl.store(out, dz.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
