"""The row-op contract that every backend implements.

A backend works on one chunk: student logits ``zs`` and teacher logits ``zt``, each [C, V]
with unit column stride (row stride may exceed V), any float dtype; all math in fp32.

``stats(zs, zt, labels, spec) -> [C, len(STATS)] fp32``
    Partial row statistics over these V columns (layouts.STATS; row_stats.py merges them).
    Without ``spec.want_entropy`` the entropy sum e_a is not computed: the column is 0.
    ``labels`` is int64 [C]: the column of the row's hard label inside this block, or -1 if
    the label is not in it (or there is no CE term).
``mix(zs, zt, norms, spec) -> [C, len(MIX)] fp32``
    Only for spec.needs_mix: the two plain sums of divergences.py, given
    ``norms`` [C, len(NORMS)] = (m_a, log_s_a, m_b, log_s_b), the full-row log-normalisers
    split as lse = m + log_s. Form log-probs as ``log p = (a - m_a) - log_s_a``, never as
    ``a - (m_a + log_s_a)``: in fp32 the sum rounds to ulp(|m|) (5e-4 at |z| = 1e4, 2e-6
    at 30), an error that the large log-ratios of KL terms then multiply.
``grad(zs, zt, labels, coef, spec, out) -> None``
    Writes dL/dzs into ``out`` ([C, V], may alias ``zs``: element-wise in place is allowed;
    and, for backends with ``packed_grad_min_rows``, a 16-bit ``out`` may overlay the first
    half of each fp32 ``zs`` row: ``zs.view(half)[:, :V]``, row stride 2 V. Its element j
    then overwrites zs column j / 2, so such a backend must read each row front to back
    before writing over it).
    ``coef`` [C, len(COEF)] fp32 = (m_a, log_s_a, m_b, log_s_b, m_z, log_s_z, aux, kd, ce),
    the same split log-normalisers for a, b and the untempered z (softmax(z) =
    exp((z - m_z) - log_s_z)), kd = d(loss)/d(divergence) / T and ce = d(loss)/d(CE).

Every backend takes the row constants of ``spec.consts`` (layouts.CONSTS: 1 / T, whether
T != 1, softcaps, logit scales, the mixture weight w_q with its logs, the gradient constant
k_div, ...) as computed once in RowSpec; none re-derives them from the options. Where a
backend loads a raw logit x it forms z = softcap(scale_s * x) (the teacher's with scale_t and
its cap), then a = z * inv_t and b = t * inv_t. The gradient passes need no scale: the chain
rule's factor scale_s is a row constant the driver folds into the coefficients kd and ce.
With p = softmax(a), q = softmax(b), logm the log of the
mixture w_q q + (1 - w_q) p (a logaddexp of log-probs, never from underflowed
probabilities), the gradient is

        dz = kd * G + ce * (softmax(z) - onehot(label))      then, with a student
        softcap c:  dz *= 1 - (c * tanh(z_raw / c) / c)**2

where G, the divergence's own gradient, is given for each divergence in divergences.py.

Rows with kd == 0 and ce == 0 must get exact zeros whatever their logits hold (ignored tokens
may carry garbage).

Student-only row ops (the sparse-teacher losses, kdkernels/sparse/); optional, None where a
backend lacks them. A column whose raw logit is -inf is *masked*: it stays -inf through the
softcap, adds nothing to the sums and gets exactly 0 in ``out`` (the driver masks the
teacher's ids this way and handles those columns itself).

``student_stats(zs, spec) -> [C, len(SSTATS)] fp32``
    (m_a, s_a, m_z, s_z, e_a): max and sum exp(x - max) of a = z * inv_t and, when
    spec.ce_separate, of the untempered z (else m_z, s_z repeat m_a, s_a), over the unmasked
    columns; a row with none has m = -inf, s = 0. Merged like STATS; e_a as in stats.
``student_grad(zs, labels, coef, spec, out) -> None``
    ``coef`` [C, len(SCOEF)] fp32 = (m_a, log_s_a, m_z, log_s_z, kd, ce). Writes

        out = kd * exp((a - m_a) - log_s_a)
              + [spec.ce_separate] ce * exp((z - m_z) - log_s_z) - ce * onehot(label)

    times the softcap derivative, 0 at masked columns. The kd term is skipped where kd == 0
    and the ce terms where ce == 0 (no exp is evaluated: its normaliser may be infinite).
    The driver folds the magnitude of the row's coefficient into log_s_a (and, at T = 1, the
    CE softmax term into the kd term), so one exp per element serves both. ``labels``, ``out``
    and the packed layout are as for ``grad``; a label column is never masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import divergences
from ..layouts import CONSTS, STATS_WEIGHTS
from ..options import KDOptions


@dataclass(frozen=True)
class RowSpec:
    """What the row kernels need to know; hashable, so it can key kernel specialisations.
    Built only by ``from_options`` / ``build``, which decide T == 1 and compute the row
    constants once for every backend."""

    divergence: str  # effective divergence (jsd with beta 0/1 already folded)
    code: int  # divergences.TABLE code: DIV in Triton, enum Div in csrc/row_math.h
    params: tuple[tuple[str, float], ...]  # the divergence's parameters, by name
    student_softcap: float | None
    teacher_softcap: float | None
    has_ce: bool
    needs_mix: bool
    consts: tuple[float, ...]  # layouts.CONSTS

    @staticmethod
    def from_options(opts: KDOptions, has_labels: bool, want_entropy: bool = True) -> RowSpec:
        """``want_entropy`` False lets the stats passes skip the student entropy's sum e_a
        (engine/autograd.row_spec: only return_components reports it)."""
        div = divergences.get(opts.effective_divergence)
        params = opts.divergence_params(div)
        t, scap, tcap = opts.temperature, opts.student_softcap, opts.teacher_softcap
        w_q, k_div = div.mixture(params)
        # T lives in consts alone (inv_t and tempered read it back): every backend, the
        # driver and the sparse teacher see the same 1 / T and the same T != 1 decision.
        named = dict(inv_t=1.0 / t, tempered=float(t != 1.0), cap_s=scap or 0.0,
                     cap_t=tcap or 0.0, k_div=k_div, scale_s=opts.student_logit_scale,
                     scale_t=opts.teacher_logit_scale,
                     stats_weight=float(getattr(STATS_WEIGHTS, div.stats_weight)),
                     want_entropy=float(want_entropy),
                     **divergences.mixture_constants(w_q))
        return RowSpec(
            divergence=div.name, code=div.code, params=tuple(params.items()),
            student_softcap=scap, teacher_softcap=tcap,
            has_ce=has_labels and opts.ce_weight > 0, needs_mix=div.needs_mix,
            consts=tuple(float(named[name]) for name in CONSTS))

    @staticmethod
    def build(divergence: str = "forward_kl", *, has_ce: bool = False,
              want_entropy: bool = True, **options) -> RowSpec:
        """A spec from loss options (tests, benchmarks): ``has_ce`` says the rows carry a CE
        term, ``want_entropy`` that the stats passes sum e_a; the other keywords are
        KDOptions fields."""
        return RowSpec.from_options(KDOptions(divergence=divergence, ce_weight=float(has_ce),
                                              **options), has_ce, want_entropy)

    def const(self, name: str) -> float:
        return self.consts[getattr(CONSTS, name)]

    @property
    def inv_t(self) -> float:
        """1 / temperature: what every tempered logit is multiplied by."""
        return self.const("inv_t")

    @property
    def tempered(self) -> bool:
        """T != 1 (decided once, in from_options)."""
        return self.const("tempered") != 0.0

    @property
    def student_scale(self) -> float:
        """The student logit scale: dL/d(raw logit) = student_scale * dL/d(scaled logit),
        so the driver multiplies the gradient coefficients by it (no kernel applies it)."""
        return self.const("scale_s")

    @property
    def want_entropy(self) -> bool:
        """The stats passes sum e_a (layouts.STATS, SSTATS); else they leave it at 0."""
        return self.const("want_entropy") != 0.0

    def param(self, name: str) -> float:
        return dict(self.params)[name]

    @property
    def ce_separate(self) -> bool:
        """CE needs softmax of the untempered z, its own stats and exp (T != 1)."""
        return self.has_ce and self.tempered

    @property
    def divergence_record(self) -> divergences.Divergence:
        return divergences.get(self.divergence)


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
    # The student-only row ops of the sparse-teacher losses (module docstring); None: absent.
    student_stats: Callable[..., torch.Tensor] | None = None
    student_grad: Callable[..., None] | None = None
