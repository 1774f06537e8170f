"""The row-op contract over the kdkernels::* torch.library ops (shared by cpp and cuda).

The ops take the divergence code and the row constants of RowSpec, never the options: every
backend gets the decisions (T == 1, the mixture kind, ...) made once in Python.
"""

from __future__ import annotations

import torch

from .base import Backend, RowSpec

_OK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def stats(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    return torch.ops.kdkernels.row_stats(zs, zt, labels, spec.code, list(spec.consts),
                                         spec.has_ce)


def mix(zs: torch.Tensor, zt: torch.Tensor, norms: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    return torch.ops.kdkernels.row_mix(zs, zt, norms.float().contiguous(), spec.code,
                                       list(spec.consts))


def grad(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor,
         spec: RowSpec, out: torch.Tensor) -> None:
    torch.ops.kdkernels.row_grad_(zs, zt, labels, coef.float().contiguous(), spec.code,
                                  list(spec.consts), spec.has_ce, out)


def student_stats(zs: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    return torch.ops.kdkernels.student_stats(zs, list(spec.consts), spec.has_ce)


def student_grad(zs: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, spec: RowSpec,
                 out: torch.Tensor) -> None:
    torch.ops.kdkernels.student_grad_(zs, labels, coef.float().contiguous(), list(spec.consts),
                                      spec.has_ce, out)


def dtype_reasons(name: str, dtype: torch.dtype) -> list[str]:
    if dtype not in _OK_DTYPES:
        return [f"{name} backend needs float32/bfloat16/float16 logits, got {dtype}"]
    return []


def workspace_bytes_per_logit(dtype: torch.dtype, device_type: str = "cuda") -> int:
    # Only the two [C, V] inputs: the kernels keep no [C, V] temporaries.
    return 2 * torch.empty((), dtype=dtype).element_size()


def backend(name: str, device_type: str) -> Backend:
    """The table entry of an extension backend serving tensors of `device_type`."""

    def not_supported_reasons(device: torch.device, dtype: torch.dtype,
                              spec: RowSpec) -> list[str]:
        why = dtype_reasons(name, dtype)
        if device.type != device_type:
            why.append(f"{name} backend runs on {device_type.upper()} tensors, got {device}")
        return why

    return Backend(name=name, stats=stats, mix=mix, grad=grad,
                   not_supported_reasons=not_supported_reasons,
                   workspace_bytes_per_logit=workspace_bytes_per_logit,
                   student_stats=student_stats, student_grad=student_grad)
