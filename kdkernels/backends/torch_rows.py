"""The `torch` backend: the row-op contract as vectorised PyTorch ops over a chunk.

Runs on any device. Each call converts the chunk to fp32 once; temporaries are [C, V] fp32,
which the chunk-size rule accounts for through WORKSPACE_BYTES_PER_LOGIT.
"""

from __future__ import annotations

import math

import torch

from ..row_stats import N_STATS
from .base import Backend, RowSpec

# zs and zt in storage, plus up to four fp32 [C, V] temporaries alive at once.
_TEMPS = 4


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 math for every storage dtype; float64 stays float64 (gradcheck, oracle-grade runs).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _capped(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    x = x.to(_acc_dtype(x))
    if cap is None:
        return x
    return torch.tanh(x / cap).mul_(cap)


def _tempered(z: torch.Tensor, t: float) -> torch.Tensor:
    return z if t == 1.0 else z / t


def _max_sum_exp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row max m, exp(x - m) and its row sum (a row of -inf gives NaN, as it should)."""
    m = x.amax(1)
    e = torch.exp(x - m[:, None])
    return m, e, e.sum(1)


def _label_logit(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    here = labels >= 0
    picked = z.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(here, picked, torch.zeros_like(picked))


def stats(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    c = zs.shape[0]
    out = torch.zeros(c, N_STATS, dtype=_acc_dtype(zs), device=zs.device)
    z = _capped(zs, spec.student_softcap)
    a = _tempered(z, spec.temperature)
    b = _tempered(_capped(zt, spec.teacher_softcap), spec.temperature)
    m_a, e_a, s_a = _max_sum_exp(a)
    out[:, 0], out[:, 1] = m_a, s_a
    if spec.divergence == "reverse_kl":
        out[:, 2] = (e_a * (a - b)).sum(1)
    del e_a
    m_b, e_b, s_b = _max_sum_exp(b)
    out[:, 3], out[:, 4] = m_b, s_b
    if spec.divergence == "forward_kl":
        out[:, 5] = (e_b * (b - a)).sum(1)
    del e_b
    if spec.has_ce and spec.temperature != 1.0:
        m_z, e_z, s_z = _max_sum_exp(z)
        out[:, 6], out[:, 7] = m_z, s_z
    else:
        out[:, 6], out[:, 7] = m_a, s_a
    if spec.has_ce:
        out[:, 8] = _label_logit(z, labels)
    return out


def _log_probs(zs, zt, norms, spec):
    """log p and log q as (x - m) - log_s: see base.py for why not x - lse."""
    m_a, ls_a, m_b, ls_b = (norms[:, i, None] for i in range(4))
    z = _capped(zs, spec.student_softcap)
    logp = (_tempered(z, spec.temperature) - m_a).sub_(ls_a)
    logq = (_tempered(_capped(zt, spec.teacher_softcap), spec.temperature) - m_b).sub_(ls_b)
    return z, logp, logq


def _log_mix(logq: torch.Tensor, logp: torch.Tensor, wq: float) -> torch.Tensor:
    """log(wq * q + (1 - wq) * p) as a logaddexp of log-probs (exact when a weight is 0)."""
    if wq == 0.0:
        return logp
    if wq == 1.0:
        return logq
    return torch.logaddexp(logq + math.log(wq), logp + math.log1p(-wq))


def _xlogy_diff(w: torch.Tensor, logx: torch.Tensor, logm: torch.Tensor) -> torch.Tensor:
    """Row sum of w * (logx - logm), with 0 where w == 0 (an underflowed probability);
    NaN stays NaN."""
    return torch.where(w == 0, torch.zeros_like(w), w * (logx - logm)).sum(1)


def mix(zs: torch.Tensor, zt: torch.Tensor, norms: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    _, logp, logq = _log_probs(zs, zt, norms, spec)
    p, q = torch.exp(logp), torch.exp(logq)
    div = spec.divergence
    if div == "jsd":
        logm = _log_mix(logq, logp, spec.beta)
        cols = (_xlogy_diff(q, logq, logm), _xlogy_diff(p, logp, logm))
    elif div == "skew_forward_kl":
        logm = _log_mix(logq, logp, spec.skew)
        cols = (_xlogy_diff(q, logq, logm), torch.exp(logq + logp - logm).sum(1))
    elif div == "skew_reverse_kl":
        logm = _log_mix(logq, logp, 1.0 - spec.skew)
        # skew p^2 / mix <= p as one exp; at skew 0 the term is absent (p / q may overflow).
        second = (torch.exp(math.log(spec.skew) + 2 * logp - logm).sum(1) if spec.skew > 0
                  else torch.zeros_like(logp[:, 0]))
        cols = (_xlogy_diff(p, logp, logm), second)
    elif div == "tvd":
        diff = p - q
        cols = (0.5 * diff.abs().sum(1), 0.5 * (p * torch.sign(diff)).sum(1))
    else:
        raise ValueError(f"mix pass is not defined for divergence {div!r}")
    return torch.stack(cols, 1)


def _soft_term(logp, logq, aux, spec: RowSpec) -> torch.Tensor:
    """G of the contract (base.py), without kd_coef."""
    p = torch.exp(logp)
    div = spec.divergence
    if div == "forward_kl":
        return p - torch.exp(logq)
    if div == "reverse_kl":
        return p * (logp - logq - aux[:, None])
    if div == "jsd":
        logm = _log_mix(logq, logp, spec.beta)
        return (1.0 - spec.beta) * p * (logp - logm - aux[:, None])
    if div == "skew_forward_kl":
        logm = _log_mix(logq, logp, spec.skew)
        # p * q / mix as one exp: q / mix alone overflows where p underflows (0 * inf).
        return -(1.0 - spec.skew) * (torch.exp(logp + logq - logm) - p * aux[:, None])
    if div == "skew_reverse_kl":
        logm = _log_mix(logq, logp, 1.0 - spec.skew)
        g = p * (logp - logm - aux[:, None])
        if spec.skew > 0:  # skew p^2 / mix <= p as one exp; at skew 0 the term is absent
            g -= torch.exp(math.log(spec.skew) + 2 * logp - logm)
        return g
    if div == "tvd":
        return p * (0.5 * torch.sign(p - torch.exp(logq)) - aux[:, None])
    raise ValueError(f"unknown divergence {div!r}")


def grad(zs, zt, labels, coef, spec: RowSpec, out) -> None:
    aux, kd_coef, ce_coef = coef[:, 6], coef[:, 7], coef[:, 8]
    z, logp, logq = _log_probs(zs, zt, coef[:, :4], spec)
    dz = _soft_term(logp, logq, aux, spec)
    del logp, logq
    dz.mul_(kd_coef[:, None])
    if spec.has_ce:
        ce = torch.exp((z - coef[:, 4, None]).sub_(coef[:, 5, None])).mul_(ce_coef[:, None])
        rows = torch.nonzero(labels >= 0).squeeze(1)
        ce[rows, labels[rows]] -= ce_coef[rows]
        dz.add_(ce)
        del ce
    if spec.student_softcap is not None:
        c = spec.student_softcap
        dz.mul_(1.0 - (z / c).square_())
    # Dead rows get exact zeros whatever their logits held (no [C, V] temporary for it).
    dz.masked_fill_(((kd_coef == 0) & (ce_coef == 0))[:, None], 0.0)
    out.copy_(dz)


def not_supported_reasons(device: torch.device, dtype: torch.dtype, spec: RowSpec) -> list[str]:
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return [f"torch backend needs float32/float64/bfloat16/float16 logits, got {dtype}"]
    return []


def workspace_bytes_per_logit(dtype: torch.dtype) -> int:
    return 2 * torch.empty((), dtype=dtype).element_size() + 4 * _TEMPS


BACKEND = Backend(
    name="torch",
    stats=stats,
    mix=mix,
    grad=grad,
    not_supported_reasons=not_supported_reasons,
    workspace_bytes_per_logit=workspace_bytes_per_logit,
)
