"""Input checks: every bad input is rejected here with the argument's name, the expected
form and what was given, before any kernel runs."""

from __future__ import annotations

import torch

from .options import KDOptions


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(name: str, t: object, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16 or "
                        f"float64), got {t.dtype}")
    return t


def check_same_device(named: dict[str, torch.Tensor | None]) -> torch.device:
    present = {k: v for k, v in named.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(f"all tensors must be on one device: {first_name} is on "
                             f"{first.device} but {name} is on {t.device}")
    return first.device


def check_head(name: str, weight: torch.Tensor, hidden_name: str, hidden: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"{name} must be [V, D] with V >= 1 and D = {hidden_name}.shape[-1] = "
                         f"{hidden.shape[-1]}; got {_shape(weight)}")


def check_bias(name: str, bias: torch.Tensor | None, rows: int) -> None:
    if bias is None:
        return
    check_tensor(name, bias)
    if bias.shape != (rows,):
        raise ValueError(f"{name} must be [{rows}] (one entry per head row); got {_shape(bias)}")


def check_pair_dtypes(hidden_name: str, hidden: torch.Tensor, weight_name: str,
                      weight: torch.Tensor, autocast: bool) -> None:
    if not autocast and hidden.dtype != weight.dtype:
        raise TypeError(f"{hidden_name} and {weight_name} must share a dtype outside "
                        f"torch.autocast; got {hidden.dtype} and {weight.dtype}")


def check_labels(labels: object, lead_shape: torch.Size, lead_name: str, vocab: int,
                 opts: KDOptions, *, check_range: bool = True) -> torch.Tensor | None:
    if labels is None:
        if opts.ce_weight > 0:
            raise ValueError(f"ce_weight={opts.ce_weight} > 0 needs labels (token ids), "
                             "but labels is None")
        return None
    labels = check_tensor("labels", labels, floating=False)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64 token ids), got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(f"labels must have the leading shape of {lead_name}, "
                         f"[{', '.join(map(str, lead_shape))}]; got {_shape(labels)}")
    labels = labels.reshape(-1).long()
    if check_range:
        check_label_range(labels, vocab, opts.ignore_index)
    return labels


def check_label_range(labels: torch.Tensor | None, vocab: int, ignore_index: int) -> None:
    """Flat labels must be token ids in [0, vocab) or ignore_index (one host sync)."""
    if labels is None or not labels.numel():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        pos = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"labels must be in [0, {vocab}) (the shared vocabulary) or equal "
                         f"ignore_index={ignore_index}; got {int(labels[pos])} at flat "
                         f"position {pos}")
