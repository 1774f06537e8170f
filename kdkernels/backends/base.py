"""The row-op contract that every backend implements.

A backend works on one chunk: student logits ``zs`` and teacher logits ``zt``, each [C, V]
with unit column stride (row stride may exceed V), any float dtype; all math in fp32.

``stats(zs, zt, labels, spec) -> [C, 9] fp32``
    Partial row statistics over these V columns (layout in row_stats.py). ``labels`` is
    int64 [C]: the column of the row's hard label inside this block, or -1 if the label is
    not in it (or there is no CE term).
``mix(zs, zt, norms, spec) -> [C, 2] fp32``
    Only for spec.needs_mix: the two plain sums of divergences.py, given
    ``norms`` [C, 4] = (m_a, log_s_a, m_b, log_s_b), the full-row log-normalisers split as
    lse = m + log_s. Form log-probs as ``log p = (a - m_a) - log_s_a``, never as
    ``a - (m_a + log_s_a)``: in fp32 the sum rounds to ulp(|m|) (5e-4 at |z| = 1e4, 2e-6
    at 30), an error that the large log-ratios of KL terms then multiply.
``grad(zs, zt, labels, coef, spec, out) -> None``
    Writes dL/dzs into ``out`` ([C, V], may alias ``zs``: element-wise in place is allowed;
    and, for backends with ``packed_grad_min_rows``, a 16-bit ``out`` may overlay the first
    half of each fp32 ``zs`` row: ``zs.view(half)[:, :V]``, row stride 2 V. Its element j
    then overwrites zs column j / 2, so such a backend must read each row front to back
    before writing over it).
    ``coef`` [C, 9] fp32 = (m_a, log_s_a, m_b, log_s_b, m_z, log_s_z, aux, kd_coef,
    ce_coef), the same split log-normalisers for a, b and the untempered z (softmax(z) =
    exp((z - m_z) - log_s_z)), kd_coef = d(loss)/d(divergence) / T and
    ce_coef = d(loss)/d(CE). With p = softmax(a),
    q = softmax(b), logm the log-mixture of the divergence (computed by logaddexp of
    log-probs, never from underflowed probabilities), the gradient is

        dz = kd_coef * G + ce_coef * (softmax(z) - onehot(label))      then, with a student
        softcap c:  dz *= 1 - (c * tanh(z_raw / c) / c)**2

    where G is
        forward_kl       p - q
        reverse_kl       p * (log p - log q - aux)
        jsd              (1 - beta) * p * (log p - logm - aux)
        skew_forward_kl  -(1 - skew) * (exp(log p + log q - logm) - p * aux)
                         (never p * (q / mix): q / mix overflows where p underflows)
        skew_reverse_kl  p * (log p - logm - aux) - exp(log skew + 2 log p - logm)
                         (skew p^2 / mix <= p; its mix-pass sum is sum skew p^2 / mix)
        tvd              p * (0.5 * sign(p - q) - aux)

    Rows with kd_coef == 0 and ce_coef == 0 must get exact zeros whatever their logits hold
    (ignored tokens may carry garbage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..divergences import NEEDS_MIX
from ..options import KDOptions


@dataclass(frozen=True)
class RowSpec:
    """What the row kernels need to know; hashable, so it can key kernel specialisations."""

    divergence: str  # effective divergence (jsd with beta 0/1 already folded)
    temperature: float
    beta: float
    skew: float
    student_softcap: float | None
    teacher_softcap: float | None
    has_ce: bool

    @staticmethod
    def from_options(opts: KDOptions, has_labels: bool) -> RowSpec:
        return RowSpec(
            divergence=opts.effective_divergence,
            temperature=opts.temperature,
            beta=opts.beta,
            skew=opts.skew,
            student_softcap=opts.student_softcap,
            teacher_softcap=opts.teacher_softcap,
            has_ce=has_labels and opts.ce_weight > 0,
        )

    @property
    def needs_mix(self) -> bool:
        return self.divergence in NEEDS_MIX


@dataclass(frozen=True)
class Backend:
    """One row of the backend table (registry.py)."""

    name: str
    stats: Callable[..., torch.Tensor]
    mix: Callable[..., torch.Tensor]
    grad: Callable[..., None]
    # Reasons this backend cannot serve tensors on `device` in `dtype` with `spec` (empty = ok).
    not_supported_reasons: Callable[[torch.device, torch.dtype, RowSpec], list[str]]
    # Bytes of chunk workspace per logit column per row, both [C, V] inputs included, for
    # logits of this dtype on this device type ("cpu", "cuda", ...).
    workspace_bytes_per_logit: Callable[[torch.dtype, str], int]
    # Rows per chunk from which grad() accepts a 16-bit ``out`` packed over fp32 ``zs`` (see
    # the module docstring); None: never, the driver gives dL/dz a buffer of its own.
    packed_grad_min_rows: Callable[[torch.device], int | None] = lambda device: None
