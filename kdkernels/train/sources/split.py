"""The train/held-out split of --data's documents.

Deterministic (a function of the documents alone: their place and content, never the
machine or the run) and never empty: of n >= 2 documents, round(fraction * n) are held out,
at least one and at most n - 1, chosen by a hash so that a folder's first or last files are
not favoured. A single document is cut in two instead: its last ``fraction`` (at a line
break where one is near) is held out.
"""

from __future__ import annotations

import hashlib
import math

from ...data.documents import Document


def check_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--heldout-fraction must be in (0, 1); got {fraction}")


def _key(doc: Document) -> str:
    return hashlib.sha256(f"{doc.where}\0{doc.prompt}\0{doc.text}".encode()).hexdigest()


def split(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents, each in the input order."""
    check_fraction(fraction)
    if not docs:
        raise ValueError("no documents to split")
    if len(docs) == 1:
        return _cut(docs[0], fraction)
    n_held = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    held = set(sorted(range(len(docs)), key=lambda i: (_key(docs[i]), i))[:n_held])
    return ([d for i, d in enumerate(docs) if i not in held],
            [d for i, d in enumerate(docs) if i in held])


def _cut(doc: Document, fraction: float) -> tuple[list[Document], list[Document]]:
    """One document: the first 1 - fraction of its trained text for training, the rest held
    out. A prompt/completion record keeps its prompt on the training side, and the held-out
    part reads prompt + trained part as its (untrained) context."""
    text = doc.text
    if len(text.strip()) < 2:
        raise ValueError(f"--data: {doc.where} is the only document and too short to split "
                         "into training and held-out text")
    cut = len(text) - max(1, math.ceil(fraction * len(text)))
    # Prefer a line break within the last 2 * fraction of the text: whole lines each side.
    newline = text.rfind("\n", 0, cut)
    if newline >= 0 and len(text) - newline <= 2 * fraction * len(text) + 1:
        cut = newline + 1
    cut = max(1, cut)
    where = doc.where or "the document"
    train = Document(text[:cut], doc.prompt, f"{where} (first part)")
    held_prompt = doc.prompt + text[:cut] if doc.prompt else ""
    held = Document(text[cut:], held_prompt, f"{where} (last part)")
    return [train], [held]
