"""Input and option checks shared by ``uld_loss`` (``logits.py``) and ``fused_linear_uld_loss``
(``fused.py``): both take the same labels, ids, offsets and loss options, and reject bad ones
with the same messages, each naming its argument."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .align import check_merge

REDUCTIONS = ("mean", "sum", "none")


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> float:
    """``value`` as a finite float within the bounds (a one-element tensor is read out)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_float_tensor(name: str, x, shape: str) -> torch.Tensor:
    """``x`` as a floating tensor with as many dimensions as ``shape`` (e.g. "[B, L, V]")
    names, which the message shows."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != shape.count(",") + 1:
        raise ValueError(f"{name} must be {shape}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    return x


class LossOptions(NamedTuple):
    """The checked numbers of one call (the weights of the hybrid stay None when not given)."""

    student_temperature: float
    teacher_temperature: float
    beta: float
    distillation_weight: float
    ce_weight: float
    matched_weight: float | None
    unmatched_weight: float | None


def check_loss_options(*, merge, reduction, student_temperature, teacher_temperature, beta,
                       distillation_weight, ce_weight, matched_weight, unmatched_weight,
                       impl=None, impls: tuple[str, ...] = (),
                       impl_of: str = "") -> LossOptions:
    """The options both losses share, in this order: merge, reduction, ``impl`` (only when
    ``impls`` is given; the message names ``impl_of``), temperatures, beta, weights."""
    check_merge(merge)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if impls and (not isinstance(impl, str) or impl not in impls):
        raise ValueError(f"impl must be one of {', '.join(impls)} for {impl_of}; got {impl!r}")
    ts = check_real("student_temperature", student_temperature, low=0.0, low_open=True)
    tt = check_real("teacher_temperature", teacher_temperature, low=0.0, low_open=True)
    beta = check_real("beta", beta, low=0.0, high=1.0)
    dw = check_real("distillation_weight", distillation_weight, low=0.0)
    cw = check_real("ce_weight", ce_weight, low=0.0)
    if matched_weight is not None:
        matched_weight = check_real("matched_weight", matched_weight, low=0.0)
    if unmatched_weight is not None:
        unmatched_weight = check_real("unmatched_weight", unmatched_weight, low=0.0)
    return LossOptions(ts, tt, beta, dw, cw, matched_weight, unmatched_weight)


def check_same_device(ref_name: str, device: torch.device, named: tuple) -> None:
    """Every tensor of ``named`` ((name, value) pairs; None and non-tensors pass) on
    ``device``, the device of ``ref_name``."""
    for name, x in named:
        if isinstance(x, torch.Tensor) and x.device != device:
            raise ValueError(f"{name} is on {x.device}, {ref_name} on {device}: they must "
                             "be on the same device")


def check_labels(student_labels, student: torch.Tensor, teacher_labels,
                 teacher: torch.Tensor, kind: str) -> None:
    """Each side's labels [B, L] match its [B, L, ...] input, ``{side}_{kind}``."""
    for name, lab, x in (("student_labels", student_labels, student),
                         ("teacher_labels", teacher_labels, teacher)):
        if not isinstance(lab, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(lab).__name__}")
        if lab.shape != x.shape[:-1]:
            raise ValueError(f"{name} must be [B, L] = {tuple(x.shape[:-1])} to match "
                             f"{name.replace('labels', kind)}, got {tuple(lab.shape)}")


def check_vocab_map(vocab_map, teacher_vocab: int, student_vocab: int,
                    device: torch.device) -> torch.Tensor:
    """``vocab_map`` as int64 [Vt] on ``device``: a student id per teacher id, or -1."""
    if not isinstance(vocab_map, torch.Tensor):
        try:
            vocab_map = torch.as_tensor(vocab_map)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"vocab_map must be a 1-D integer tensor, got "
                            f"{type(vocab_map).__name__}") from e
    if vocab_map.is_floating_point() or vocab_map.is_complex() or vocab_map.dtype == torch.bool:
        raise TypeError(f"vocab_map must be an integer tensor, got {vocab_map.dtype}")
    if vocab_map.dim() != 1 or vocab_map.numel() != teacher_vocab:
        raise ValueError(f"vocab_map must be [Vt] = [{teacher_vocab}] (one entry per teacher "
                         f"logit column), got shape {tuple(vocab_map.shape)}")
    if vocab_map.numel():
        lo, hi = int(vocab_map.min()), int(vocab_map.max())
        if lo < -1 or hi >= student_vocab:
            bad = lo if lo < -1 else hi
            raise ValueError(f"vocab_map has id {bad}: entries must be -1 (unmatched) or a "
                             f"student id in [0, {student_vocab})")
    return vocab_map.to(device=device, dtype=torch.long)
