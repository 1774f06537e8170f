"""TRL's distillation-loss contract served by the fused loss: ``fused_divergence_loss`` takes the
arguments of ``trl.trainer.distillation_trainer._chunked_divergence_loss`` and returns what it
returns, ``(loss, student entropy sum, valid count)``, computed by ``fused_linear_kd_loss``.

It needs no TRL: KDDistillationTrainer (kdkernels.integrations.trl) calls it, and the parity
tests call it beside TRL's own function on the same inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..dense.api import fused_linear_kd
from ..hf import engine_heads
from ..options import KDOptions, option_fields

# What TRL's loss does that kdkernels' defaults do not: the generalised JSD, no T**2 (TRL
# never scales by it), the divergence only (no hard-label term).
TRL_DEFAULTS: dict[str, Any] = dict(divergence="jsd", scale_by_t2=False, kd_weight=1.0,
                                    ce_weight=0.0)
# Options set by TRL's own arguments of _chunked_divergence_loss (its config's beta and
# temperature, each model's logit scale and softcap) or by its contract: a sum over the
# completion mask, normalised here, with the entropy taken from the components.
TRL_ARGUMENTS = ("beta", "temperature", "student_logit_scale", "teacher_logit_scale",
                 "student_softcap", "teacher_softcap")
CONTRACT_OPTIONS = ("ignore_index", "reduction", "num_items", "return_components")


def extra_options() -> tuple[str, ...]:
    """The options a caller may set beyond TRL's arguments: every other KDOptions field."""
    taken = TRL_ARGUMENTS + CONTRACT_OPTIONS
    return tuple(f.name for f in option_fields(KDOptions) if f.name not in taken)


def _with_defaults(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(extra_options()))
    if unknown:
        raise TypeError(f"unknown loss option(s) {', '.join(unknown)}; the fused TRL loss "
                        f"takes {', '.join(extra_options())}")
    merged = {**TRL_DEFAULTS, **options}
    merged["divergence"] = merged["divergence"] or TRL_DEFAULTS["divergence"]  # None: TRL's
    return merged


def check_extra_options(options: dict[str, Any]) -> dict[str, Any]:
    """The extra loss options with TRL's defaults filled in; bad ones raise (naming them)."""
    merged = _with_defaults(options)
    KDOptions(**merged)
    return merged


def _mask_labels(completion_mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    keep = completion_mask != 0
    if labels is None:  # ids matter only to a hard-label term; the mask is what counts here
        return torch.where(keep, 0, -100)
    if labels.shape != completion_mask.shape:
        raise ValueError(f"labels must have the completion mask's shape "
                         f"{list(completion_mask.shape)}; got {list(labels.shape)}")
    return labels.masked_fill(~keep, -100)


def fused_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    labels: torch.Tensor | None = None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's ``_chunked_divergence_loss`` through ``fused_linear_kd_loss``.

    Hidden states [B, K, H] aligned with the completion tokens, ``completion_mask`` [B, K]
    (non-zero = in the loss). The generalised JSD(beta) by default (beta 0 = forward KL,
    1 = reverse KL, exactly); ``options`` (extra_options()) may pick another divergence, add a
    hard-label term on ``labels`` (the completion ids) with ``ce_weight``, or tune the kernel.
    Returns (loss: the sum over kept tokens / num_items_in_batch, or their mean without it;
    the sum of the student's per-token entropy at the temperature, detached; the kept count).
    """
    opts = KDOptions(**_with_defaults(options), beta=beta, temperature=temperature,
                     student_softcap=student_final_logit_softcapping,
                     teacher_softcap=teacher_final_logit_softcapping,
                     student_logit_scale=student_logit_scale,
                     teacher_logit_scale=teacher_logit_scale, reduction="sum",
                     return_components=True)
    if opts.ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels (the completion token ids)")
    # ZeRO-3 heads are gathered for this call only, FSDP2 DTensor heads once (engine_heads); the
    # caller runs this inside the wrapped model's forward, as TRL's trainer does.
    with engine_heads.gathered(student_lm_head_weight, student_lm_head_bias,
                               teacher_lm_head_weight, teacher_lm_head_bias):
        w, bs = engine_heads.full(student_lm_head_weight, student_lm_head_bias,
                                  student_hidden_states.dtype)
        u, bt = engine_heads.full(teacher_lm_head_weight, teacher_lm_head_bias,
                                  teacher_hidden_states.dtype)
        out = fused_linear_kd(student_hidden_states, w, teacher_hidden_states, u,
                              _mask_labels(completion_mask, labels), opts, student_bias=bs,
                              teacher_bias=bt)
    n_valid = out.n_tokens
    if num_items_in_batch is None:
        # Clamped as TRL does, so a rank whose tokens are all masked gives 0, not 0 / 0.
        denominator = n_valid.clamp(min=1).to(out.loss.dtype)
    elif isinstance(num_items_in_batch, torch.Tensor):
        denominator = num_items_in_batch.to(out.loss.device)
    else:
        denominator = float(num_items_in_batch)
    return out.loss / denominator, out.student_entropy.detach(), n_valid
