"""Fake (meta) impls of the kdkernels::* row ops, so they trace under torch.compile.

The schemas and device impls live in csrc/register.cpp; this module is imported by
kdkernels._build once the CPU library (which defines the schemas) is loaded. The fakes check
what the real ops check about shapes and dtypes (not values: labels in range need the data),
so a bad call fails the same way when traced as when run.
"""

from __future__ import annotations

import torch

from ..divergences import TABLE
from ..layouts import COEF, CONSTS, MIX, NORMS, SCOEF, SSTATS, STATS

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_student(op: str, zs, consts) -> None:
    torch._check(zs.dim() == 2, lambda: f"{op}: zs must be a 2-D [C, V] tensor, got shape "
                 f"{tuple(zs.shape)}")
    torch._check(zs.dtype in _LOGIT_DTYPES, lambda: f"{op}: zs must be float32, bfloat16 or "
                 f"float16, got {zs.dtype}")
    torch._check(len(consts) == len(CONSTS), lambda: f"{op}: consts must be a list of "
                 f"{len(CONSTS)} floats in kdkernels.layouts.CONSTS order (RowSpec.consts), "
                 f"got {len(consts)}")


def _check_out(op: str, out, zs) -> None:
    torch._check(out.dim() == 2, lambda: f"{op}: out must have shape {tuple(zs.shape)} (as "
                 f"zs), got {tuple(out.shape)}")
    for d in range(2):
        torch._check(out.shape[d] == zs.shape[d], lambda: f"{op}: out must have shape "
                     f"{tuple(zs.shape)} (as zs), got {tuple(out.shape)}")
    torch._check(out.dtype in _LOGIT_DTYPES, lambda: f"{op}: out must be float32, bfloat16 "
                 f"or float16, got {out.dtype}")


def _check_call(op: str, zs, zt, div, consts) -> None:
    torch._check(zs.dim() == 2, lambda: f"{op}: zs must be a 2-D [C, V] tensor, got shape "
                 f"{tuple(zs.shape)}")
    torch._check(zt.dim() == 2, lambda: f"{op}: zt must have shape {tuple(zs.shape)} (as zs), "
                 f"got {tuple(zt.shape)}")
    for d in range(2):
        torch._check(zt.shape[d] == zs.shape[d], lambda: f"{op}: zt must have shape "
                     f"{tuple(zs.shape)} (as zs), got {tuple(zt.shape)}")
    for name, x in (("zs", zs), ("zt", zt)):
        torch._check(x.dtype in _LOGIT_DTYPES, lambda name=name, x=x: f"{op}: {name} must be "
                     f"float32, bfloat16 or float16, got {x.dtype}")
    torch._check(0 <= div < len(TABLE), lambda: f"{op}: div must be a divergence code in "
                 f"[0, {len(TABLE)}) (kdkernels.divergences.TABLE), got {div}")
    torch._check(len(consts) == len(CONSTS), lambda: f"{op}: consts must be a list of "
                 f"{len(CONSTS)} floats in kdkernels.layouts.CONSTS order (RowSpec.consts), "
                 f"got {len(consts)}")


def _check_rows(op: str, name: str, x, zs, width: int | None, dtype: torch.dtype) -> None:
    want = (zs.shape[0],) if width is None else (zs.shape[0], width)
    torch._check(x.dim() == len(want), lambda: f"{op}: {name} must have shape {want}, got "
                 f"{tuple(x.shape)}")
    for d, n in enumerate(want):
        torch._check(x.shape[d] == n, lambda: f"{op}: {name} must have shape {want}, got "
                     f"{tuple(x.shape)}")
    torch._check(x.dtype == dtype, lambda: f"{op}: {name} must be {dtype}, got {x.dtype}")


@torch.library.register_fake("kdkernels::row_stats")
def _row_stats_fake(zs, zt, labels, div, consts, has_ce):
    op = "kdkernels::row_stats"
    _check_call(op, zs, zt, div, consts)
    _check_rows(op, "labels", labels, zs, None, torch.int64)
    return zs.new_empty((zs.shape[0], len(STATS)), dtype=torch.float32)


@torch.library.register_fake("kdkernels::row_mix")
def _row_mix_fake(zs, zt, norms, div, consts):
    op = "kdkernels::row_mix"
    _check_call(op, zs, zt, div, consts)
    torch._check(TABLE[div].needs_mix, lambda: f"{op}: divergence code {div} has no mix pass")
    _check_rows(op, "norms", norms, zs, len(NORMS), torch.float32)
    return zs.new_empty((zs.shape[0], len(MIX)), dtype=torch.float32)


@torch.library.register_fake("kdkernels::row_grad_")
def _row_grad_fake(zs, zt, labels, coef, div, consts, has_ce, out):
    op = "kdkernels::row_grad_"
    _check_call(op, zs, zt, div, consts)
    _check_rows(op, "labels", labels, zs, None, torch.int64)
    _check_rows(op, "coef", coef, zs, len(COEF), torch.float32)
    _check_out(op, out, zs)
    return None


@torch.library.register_fake("kdkernels::student_stats")
def _student_stats_fake(zs, consts, has_ce):
    _check_student("kdkernels::student_stats", zs, consts)
    return zs.new_empty((zs.shape[0], len(SSTATS)), dtype=torch.float32)


@torch.library.register_fake("kdkernels::student_grad_")
def _student_grad_fake(zs, labels, coef, consts, has_ce, out):
    op = "kdkernels::student_grad_"
    _check_student(op, zs, consts)
    _check_rows(op, "labels", labels, zs, None, torch.int64)
    _check_rows(op, "coef", coef, zs, len(SCOEF), torch.float32)
    _check_out(op, out, zs)
    return None
