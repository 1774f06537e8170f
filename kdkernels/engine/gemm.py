"""The GEMMs of the chunk driver: logits into preallocated buffers, fp32 weight-grad sums.

On CUDA, bf16/fp16 GEMMs can emit fp32 (``out_dtype``), so logits are never rounded to 16
bits before the softmax. The CPU kernels cannot; there the logits stay in the input dtype
and the row ops upcast them per chunk.
"""

from __future__ import annotations

import functools
import os

import torch

_HALF = (torch.bfloat16, torch.float16)
# Rows of a vocab block in the CPU weight-grad fallback: bounds its temporary to ~16 MiB.
_BLOCK_BYTES = 16 * 2**20


@functools.cache
def cpu_has_fast_half_gemm() -> bool:
    """Whether this CPU multiplies bf16/fp16 natively (AVX512-BF16/FP16 or AMX). Without it,
    torch's half GEMMs fall back to paths several times slower than fp32 (docs/design.md has
    the figures). KDKERNELS_CPU_HALF_GEMM=1/0 overrides the detection."""
    forced = os.environ.get("KDKERNELS_CPU_HALF_GEMM")
    if forced is not None:
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True  # not Linux: trust torch's kernels
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "avx512_fp16"))


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the chunk GEMMs run in: the input's, except half types on CPUs without
    native half GEMMs, which run in fp32 (their results are then also more accurate)."""
    if (device.type == "cpu" and dtype in _HALF and not cpu_has_fast_half_gemm()):
        return torch.float32
    return dtype


@functools.cache
def _fp32_out_supported(device_type: str, dtype: torch.dtype) -> bool:
    if dtype not in _HALF or device_type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, device=device_type, dtype=dtype)
        out = torch.empty(2, 2, device=device_type, dtype=torch.float32)
        torch.mm(a, a, out_dtype=torch.float32, out=out)
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        return True
    except (RuntimeError, TypeError):
        return False


def logits_dtype(compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    return torch.float32 if _fp32_out_supported(device.type, compute_dtype) else compute_dtype


def logits_into(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                out: torch.Tensor) -> torch.Tensor:
    """out[:] = x @ w.T (+ bias); out may be fp32 while x, w are half."""
    if out.dtype == x.dtype:
        if bias is None:
            return torch.mm(x, w.t(), out=out)
        return torch.addmm(bias.to(out.dtype), x, w.t(), out=out)
    torch.mm(x, w.t(), out_dtype=out.dtype, out=out)
    if bias is not None:
        out.add_(bias)
    return out


def accumulate_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc in fp32 (or float64) whatever the dtype of a and b."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _fp32_out_supported(a.device.type, a.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        rows = max(1, _BLOCK_BYTES // max(1, b.shape[1] * a.element_size()))
        for start in range(0, a.shape[0], rows):
            acc[start:start + rows].add_(a[start:start + rows] @ b)
