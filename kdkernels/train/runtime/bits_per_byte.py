"""Held-out quality across tokenizers: bits per byte.

Per-token cross-entropy is not comparable between models with different tokenizers: a token
of one covers more or less text than a token of the other, so nats per token rewards short
tokens or long ones, not better predictions. What both models predict is the same text, so
the measure is the text's code length per byte: the model's summed next-token NLL over the
held-out windows (nats, every token of its own tokenization of them) divided by ln 2 times
the UTF-8 bytes of the text those tokens cover (the same text on both sides).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..batches.streams import IGNORE_INDEX
from .evaluation import heldout_ce

WHY = ("per-token CE is not comparable across tokenizers (a token of one covers a different "
       "amount of text than a token of the other); bits per byte = summed held-out NLL / "
       "(ln 2 x UTF-8 bytes of the held-out text), the same text for every model")


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Summed NLL (nats) over the text's tokens -> bits per UTF-8 byte of the text."""
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs text: got {n_bytes} bytes")
    return nll_nats / (math.log(2) * n_bytes)


def labelled_tokens(batches: list) -> int:
    """Tokens a held-out set scores: labels (or the shifted inputs) not ignore_index."""
    n = 0
    for b in batches:
        y = b[1] if isinstance(b, tuple) else b[:, 1:]
        n += int((y != IGNORE_INDEX).sum())
    return n


def from_mean_ce(mean_ce: float, batches: list, n_bytes: int) -> float:
    """Bits per byte from heldout_ce's mean (nats/token) over ``batches``."""
    return bits_per_byte(mean_ce * labelled_tokens(batches), n_bytes)


@torch.no_grad()
def heldout_bits_per_byte(model: nn.Module, batches: list, n_bytes: int,
                          device: torch.device, autocast: bool = False) -> dict[str, float]:
    """The model's held-out CE (nats per token of its own tokenizer) and bits per byte."""
    ce = heldout_ce(model, batches, device, autocast)
    return {"heldout_ce": ce, "bits_per_byte": from_mean_ce(ce, batches, n_bytes)}


def report_lines(results: dict[str, dict[str, Any]], label) -> list[str]:
    """The report's bits-per-byte lines (none when no model has one)."""
    rows = [(k, r) for k, r in results.items() if r.get("bits_per_byte") is not None]
    if not rows:
        return []
    out = ["", f"Held-out bits per byte (lower is better; {WHY}; the CE column above is in "
               "nats per token of each model's own tokenizer):", ""]
    out += [f"- {label(k, r)}: {r['bits_per_byte']:.4f} bits/byte" for k, r in rows]
    ce = results.get("ce", {}).get("bits_per_byte")
    for k, r in rows:
        if ce is not None and k not in ("ce", "teacher"):
            out.append(f"- {label(k, r)} vs CE only: {ce - r['bits_per_byte']:+.4f} bits/byte "
                       "(positive = distillation helped)")
    return out
