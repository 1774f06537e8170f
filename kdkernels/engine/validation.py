"""Input checks: every bad input is rejected here with the argument's name, the expected
form and what was given, before any kernel runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import KDOptions


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


def check_labels(labels: object, lead_shape: torch.Size, lead_name: str,
                 opts: KDOptions) -> torch.Tensor | None:
    """Flat int64 labels of the right shape; their range is checked with the kept-row scan
    (scan_labels), inside the loss, so that one host sync does both."""
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
    return labels.reshape(-1).long()


@dataclass(frozen=True)
class KeptRows:
    """The rows whose label is not ignore_index."""

    kept: int
    idx: torch.Tensor | None  # [kept] int64 row indices; None when every row is kept
    mask: torch.Tensor | None  # [N] bool; None when there are no labels


def scan_labels(labels: torch.Tensor | None, n_rows: int, vocab: int,
                ignore_index: int) -> KeptRows:
    """Check flat labels [n_rows] (token ids in [0, vocab) or ignore_index) and find the
    kept rows, with one host sync for both (none without labels)."""
    if labels is None or n_rows == 0:
        return KeptRows(n_rows, None, None)
    keep = labels != ignore_index
    bad = keep & ((labels < 0) | (labels >= vocab))
    n_bad, kept = torch.stack((bad.sum(), keep.sum())).tolist()
    if n_bad:
        pos = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"labels must be in [0, {vocab}) (the shared vocabulary) or equal "
                         f"ignore_index={ignore_index}; got {int(labels[pos])} at flat "
                         f"position {pos}")
    # nonzero_static: the count is known, so finding the rows needs no second sync
    idx = None if kept == labels.numel() else torch.nonzero_static(keep, size=kept)[:, 0]
    return KeptRows(int(kept), idx, keep)
