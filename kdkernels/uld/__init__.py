"""Cross-tokenizer distillation: ULD and GOLD's hybrid loss (TRL 1.16 semantics).

``fused.py`` is the loss from hidden states and heads (``fused_linear_uld_loss``: chunked over
groups, never the [tokens x vocab] logits; ``rows.py`` holds its per-chunk row math).
``align.py`` aligns the two tokenizations of one text by byte spans (GOLD's walk) into flat
groups, ``logits.py`` is the loss on materialised logits (``uld_loss``), ``checks.py`` the
input and option checks the two losses share, ``reference.py`` a float64 per-sample oracle,
``vocab.py`` / ``text.py`` build the vocabulary map and the inputs from text (they import
``transformers`` only when called).
"""

from .align import MERGES, AlignedGroups, SideGroups, align_batch
from .fused import fused_linear_uld_loss
from .logits import uld_loss
from .text import uld_inputs_from_text
from .vocab import build_vocab_map

__all__ = [
    "MERGES",
    "AlignedGroups",
    "SideGroups",
    "align_batch",
    "build_vocab_map",
    "fused_linear_uld_loss",
    "uld_inputs_from_text",
    "uld_loss",
]
