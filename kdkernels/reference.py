"""The float64 oracle: a plain, materialising implementation of every option.

It is deliberately naive (full [N, V] logits, log_softmax, autograd for gradients) so that
it can be read in one sitting and trusted; every backend is tested against it. It imports
nothing from the package (no option handling is shared with the code it judges): plain
keyword arguments, its own plain formulas, including the TRL convention that jsd at beta 0
or 1 is forward or reverse KL.
"""

from __future__ import annotations

import math

import torch

# Options that choose how the loss is computed, not what it is: accepted and ignored.
_EXECUTION_OPTIONS = frozenset({"chunk_size", "max_workspace_bytes", "impl",
                                "return_components"})


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def _plogp_ratio(w: torch.Tensor, logx: torch.Tensor, logy: torch.Tensor) -> torch.Tensor:
    """Row sums of w * (logx - logy), taking 0 * anything = 0 (NaN stays NaN)."""
    return torch.where(w == 0, torch.zeros_like(w), w * (logx - logy)).sum(-1)


def _log_mix(logq: torch.Tensor, logp: torch.Tensor, wq: float) -> torch.Tensor:
    """log(wq * q + (1 - wq) * p)."""
    parts = []
    if wq > 0:
        parts.append(logq + math.log(wq))
    if wq < 1:
        parts.append(logp + math.log(1 - wq))
    return torch.logsumexp(torch.stack(parts), 0)


def _divergence(a: torch.Tensor, b: torch.Tensor, name: str, beta: float = 0.5,
               skew: float = 0.1, alpha: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher q = softmax(b) and student p = softmax(a)."""
    logp, logq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    p, q = logp.exp(), logq.exp()
    if name == "jsd" and beta == 0:
        name = "forward_kl"
    if name == "jsd" and beta == 1:
        name = "reverse_kl"
    if name == "forward_kl":
        return _plogp_ratio(q, logq, logp)
    if name == "reverse_kl":
        return _plogp_ratio(p, logp, logq)
    if name == "jsd":
        logm = _log_mix(logq, logp, beta)
        return beta * _plogp_ratio(q, logq, logm) + (1 - beta) * _plogp_ratio(p, logp, logm)
    if name == "skew_forward_kl":
        return _plogp_ratio(q, logq, _log_mix(logq, logp, skew))
    if name == "skew_reverse_kl":
        return _plogp_ratio(p, logp, _log_mix(logq, logp, 1 - skew))
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "alpha":  # Amari: (1 - sum q^alpha p^(1 - alpha)) / (alpha (1 - alpha))
        return (1 - torch.exp(alpha * logq + (1 - alpha) * logp).sum(-1)) / (alpha * (1 - alpha))
    raise ValueError(f"unknown divergence {name!r}")


def reference_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None = None, *,
                      compute_dtype: torch.dtype = torch.float64, divergence: str = "forward_kl",
                      beta: float = 0.5, skew: float = 0.1, alpha: float = 0.5,
                      temperature: float = 1.0, scale_by_t2: bool = True,
                      kd_weight: float = 1.0, ce_weight: float = 0.0,
                      student_softcap: float | None = None,
                      teacher_softcap: float | None = None, student_logit_scale: float = 1.0,
                      teacher_logit_scale: float = 1.0, ignore_index: int = -100,
                      reduction: str = "mean", num_items: float | None = None,
                      **execution) -> dict[str, torch.Tensor]:
    """Loss on materialised logits, in float64 (or compute_dtype: the tests' naive
    same-dtype yardstick). Returns loss, kd_rows, ce_rows, kept, and the per-token signals
    student_entropy (of softmax(z / T), z the scaled, capped student logits) and
    label_logprob (log softmax(z) at the label; NaN rows without labels), 0 at ignored
    tokens like kd_rows; ``reduce_rows`` reduces any of them as the loss is reduced."""
    unknown = set(execution) - _EXECUTION_OPTIONS
    if unknown:
        raise TypeError(f"reference_kd_loss: unknown options {sorted(unknown)}")
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    # logit scales multiply the raw logits, before the softcap and the temperature
    z = _softcap(student_logit_scale * student_logits[..., :vocab].to(compute_dtype),
                 student_softcap)
    t = _softcap(teacher_logit_scale * teacher_logits[..., :vocab].to(compute_dtype),
                 teacher_softcap)
    z, t = z.reshape(-1, vocab), t.reshape(-1, vocab)
    kd = _divergence(z / temperature, t / temperature, divergence, beta, skew, alpha)
    logp = torch.log_softmax(z / temperature, -1)
    entropy = -torch.where(logp.exp() == 0, torch.zeros_like(logp), logp.exp() * logp).sum(-1)
    keep = torch.ones_like(kd, dtype=torch.bool)
    ce = torch.zeros_like(kd)
    label_logprob = torch.full_like(kd, math.nan)
    if labels is not None:
        labels = labels.reshape(-1)
        keep = labels != ignore_index
        safe = torch.where(keep, labels, torch.zeros_like(labels))
        ce = torch.logsumexp(z, -1) - z.gather(1, safe[:, None]).squeeze(1)
        label_logprob = torch.log_softmax(z, -1).gather(1, safe[:, None]).squeeze(1)
    t2 = temperature**2 if scale_by_t2 else 1.0
    rows = kd_weight * t2 * kd + ce_weight * ce
    zero = torch.zeros_like(rows)
    rows, kd, ce, entropy = (torch.where(keep, x, zero) for x in (rows, kd, ce, entropy))
    if labels is not None:
        label_logprob = torch.where(keep, label_logprob, zero)
    kept = int(keep.sum())
    return {"loss": reduce_rows(rows, kept, reduction, num_items), "kd_rows": kd,
            "ce_rows": ce, "kept": kept, "student_entropy": entropy,
            "label_logprob": label_logprob}


def reduce_rows(rows: torch.Tensor, kept: int, reduction: str = "mean",
                num_items: float | None = None) -> torch.Tensor:
    """Per-token rows (0 at ignored tokens) reduced as the loss is: as they are, summed, or
    summed over num_items (default: the kept tokens)."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (num_items if num_items is not None else max(kept, 1))


def reference_fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden,
                                   teacher_weight, labels=None, *, student_bias=None,
                                   teacher_bias=None, **options) -> dict[str, torch.Tensor]:
    """Fused-linear loss in float64: logits = hidden @ weight.T + bias, then the above."""
    def logits(x, w, b):
        z = x.double().reshape(-1, x.shape[-1]) @ w.double().t()
        return z if b is None else z + b.double()

    zs = logits(student_hidden, student_weight, student_bias)
    zt = logits(teacher_hidden, teacher_weight, teacher_bias)
    return reference_kd_loss(zs, zt, labels, **options)


divergence = _divergence  # the per-row formulas, public for the tests
