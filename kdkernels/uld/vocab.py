"""The hybrid loss's vocabulary map: teacher id -> student id of the same token string."""

from __future__ import annotations

import torch


def build_vocab_map(student_tokenizer, teacher_tokenizer,
                    teacher_vocab_size: int | None = None) -> torch.Tensor:
    """int64 ``[Vt]``: ``map[t]`` is the student id whose token string equals teacher token
    t's (exact match of the tokenizers' ``get_vocab()`` strings, added tokens included, as
    GOLD's ``ULDLoss`` matches them), or -1.

    ``teacher_vocab_size`` is the width of the teacher's logits (default: the teacher
    tokenizer's size); ids beyond the tokenizer (padded LM-head rows) map to -1."""
    for name, tok in (("student_tokenizer", student_tokenizer),
                      ("teacher_tokenizer", teacher_tokenizer)):
        if not callable(getattr(tok, "get_vocab", None)):
            raise TypeError(f"{name} must be a tokenizer with get_vocab(), got "
                            f"{type(tok).__name__}")
    student = student_tokenizer.get_vocab()
    teacher = teacher_tokenizer.get_vocab()
    largest = max(teacher.values(), default=-1) + 1
    if teacher_vocab_size is None:
        teacher_vocab_size = max(largest, len(teacher_tokenizer))
    if isinstance(teacher_vocab_size, bool) or not isinstance(teacher_vocab_size, int):
        raise TypeError(f"teacher_vocab_size must be an int, got {teacher_vocab_size!r}")
    if teacher_vocab_size < largest:
        raise ValueError(f"teacher_vocab_size ({teacher_vocab_size}) is smaller than the teacher "
                         f"tokenizer's ids (up to {largest - 1}): give the teacher logits' width")
    out = torch.full((teacher_vocab_size,), -1, dtype=torch.long)
    pairs = [(t, student[s]) for s, t in teacher.items() if s in student]
    if pairs:
        ids = torch.tensor(pairs, dtype=torch.long)
        out[ids[:, 0]] = ids[:, 1]
    return out
