"""Element-wise helpers shared by the row kernels, and the divergence codes.

Only tl core ops are used (no libdevice): the same code runs compiled and under the CPU
interpreter, which does not patch libdevice.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Helpers called from kernels. Under the CPU interpreter each nested @triton.jit call
# re-patches triton.language (~5 ms, most of a small launch), so there they are plain
# Python functions run inside the caller's patched scope; compiled, they are @triton.jit.
helper = (lambda fn: fn) if os.environ.get("TRITON_INTERPRET", "0") == "1" else triton.jit

# Divergence codes (DIV constexpr); kdkernels.backends.triton_rows maps names to them.
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKEW_FORWARD_KL = tl.constexpr(3)
SKEW_REVERSE_KL = tl.constexpr(4)
TVD = tl.constexpr(5)
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3,
                    "skew_reverse_kl": 4, "tvd": 5}

# MIX_KIND constexpr: which terms the log-mixture log(wq q + (1 - wq) p) has.
MIX_BOTH = tl.constexpr(0)
MIX_ONLY_Q = tl.constexpr(1)  # wq == 1: log m = log q exactly
MIX_ONLY_P = tl.constexpr(2)  # wq == 0: log m = log p exactly


def mix_kind(wq: float) -> int:
    return 1 if wq == 1.0 else (2 if wq == 0.0 else 0)


# tl.constexpr flags shared by the mix and gradient kernels (stats adds SEPARATE_Z).
SPEC_FLAGS = {
    "HAS_CAP_S": lambda a: a["cap_s"] > 0,
    "HAS_CAP_T": lambda a: a["cap_t"] > 0,
    "TEMPERED": lambda a: a["inv_t"] != 1.0,
    "MIX_KIND": lambda a: mix_kind(a["wq"]),
}


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
def log_mix(logq, logp, lwq, lwp, MIX_KIND: tl.constexpr):
    """log(wq * q + (1 - wq) * p) as a logaddexp of the log-probs, lwq = log wq and
    lwp = log(1 - wq); exact when a weight is 0, -inf (not NaN) when both terms are."""
    if MIX_KIND == MIX_ONLY_Q:
        return logq
    elif MIX_KIND == MIX_ONLY_P:
        return logp
    else:
        x = logq + lwq
        y = logp + lwp
        hi = tl.maximum(x, y)
        lo = tl.minimum(x, y)
        finite_hi = tl.where(hi == float("-inf"), 0.0, hi)
        out = finite_hi + tl.log(1.0 + tl.exp(lo - finite_hi))
        out = tl.where(hi == float("-inf"), float("-inf"), out)
        # max/min return the other operand for a NaN (IEEE maxNum, on GPUs and in the
        # interpreter): put the NaN back so that NaN logits give a NaN loss.
        return tl.where((x != x) | (y != y), x + y, out)


@helper
def load_logits(ptr, row_off, cols, mask, cap, inv_t, HAS_CAP: tl.constexpr,
                TEMPERED: tl.constexpr):
    """(capped logits z, tempered logits z * inv_t) of a tile, fp32. Masked lanes hold
    finite junk (0): callers mask what they reduce (no -inf - -inf on dead lanes)."""
    z = tl.load(ptr + row_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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
