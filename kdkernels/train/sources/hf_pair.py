"""--teacher/--student as users have them: Hugging Face directories (or hub ids), each with or
without a tokenizer, heads possibly padded beyond the tokenizer, the teacher in fp32, bf16 or
fp16. Loads both, checks the pair (models.check_pair states the rule for one vocabulary;
different tokenizers go to the cross-tokenizer loss, cross_pair.py) and picks the tokenizer
that reads --data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...hf import models
from . import cross_pair

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Pair:
    teacher: nn.Module
    student: nn.Module
    tok: Any  # the teacher's tokenizer, else the student's (cross: the student's)
    cross: bool = False  # different tokenizers: the cross-tokenizer loss (cross_pair.py)
    student_tok: Any = None
    teacher_tok: Any = None


def teacher_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--teacher-dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):  # no tokenizer files in this directory
        return None


def load(teacher_path: str, student_path: str, *, dtype: str = "fp32",
         device: torch.device | str = "cpu") -> Pair:
    """Teacher (eval, ``dtype``, on ``device``) and student (fp32, on the CPU until the loop
    moves it) with their tokenizers checked as one vocabulary."""
    from transformers import AutoModelForCausalLM

    torch_dtype = teacher_dtype(dtype)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch_dtype)
    teacher = teacher.to(device).eval()
    # The student's master weights stay fp32 whatever its checkpoint holds (use --bf16 for
    # autocast); the fused loss takes a bf16/fp16 teacher with an fp32 student.
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    teacher_tok, student_tok = _tokenizer(teacher_path), _tokenizer(student_path)
    if teacher_tok is None and student_tok is None:
        raise ValueError(f"neither --teacher {teacher_path} nor --student {student_path} has a "
                         "tokenizer; the trainer needs one to read --data: save it with "
                         "either model (tokenizer.save_pretrained)")
    if cross_pair.differ(student_tok, teacher_tok):  # no longer refused: ULD / hybrid
        cross_pair.check_heads(student, teacher, student_tok, teacher_tok)
        return Pair(teacher, student, student_tok, True, student_tok, teacher_tok)
    models.check_pair(student, teacher, student_tok, teacher_tok)
    tok = teacher_tok if teacher_tok is not None else student_tok
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer of {teacher_path if teacher_tok else student_path} "
                         "has no EOS token; the trainer ends every document with one")
    return Pair(teacher, student, tok)
