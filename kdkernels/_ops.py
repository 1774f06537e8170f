"""Fake (meta) impls of the kdkernels::* row ops, so they trace under torch.compile.

The schemas and device impls live in csrc/register.cpp; this module is imported by
kdkernels._build once the CPU library (which defines the schemas) is loaded.
"""

from __future__ import annotations

import torch

from .row_stats import N_MIX, N_STATS


@torch.library.register_fake("kdkernels::row_stats")
def _row_stats_fake(zs, zt, labels, divergence, temperature, beta, skew, student_softcap,
                    teacher_softcap, has_ce):
    return zs.new_empty((zs.shape[0], N_STATS), dtype=torch.float32)


@torch.library.register_fake("kdkernels::row_mix")
def _row_mix_fake(zs, zt, norms, divergence, temperature, beta, skew, student_softcap,
                  teacher_softcap):
    return zs.new_empty((zs.shape[0], N_MIX), dtype=torch.float32)


@torch.library.register_fake("kdkernels::row_grad_")
def _row_grad_fake(zs, zt, labels, coef, divergence, temperature, beta, skew, student_softcap,
                   teacher_softcap, has_ce, out):
    return None
