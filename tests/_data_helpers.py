"""A Qwen-shaped model pair and data files for the --data / --teacher tests."""

from __future__ import annotations

import functools
import json
import sysconfig
from pathlib import Path

from kdkernels.train.config import ModelSize, TrainConfig
from kdkernels.train.sources.tiny_llama import build_llama

TOKENS = 1000  # the shared tokenizer; heads may be padded beyond it
STUDENT = ModelSize(32, 1, 2, 64)


@functools.lru_cache(maxsize=1)
def tokenizer():
    """A byte-level BPE of exactly TOKENS entries, trained on a stdlib module (offline)."""
    from kdkernels.train.sources.tokenizer import train_bpe

    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    tok = train_bpe([text], TOKENS)
    assert len(tok) == TOKENS
    return tok


def save_model(path: Path, rows: int, *, tied: bool = True, with_tokenizer: bool = True,
               size: ModelSize = STUDENT, seed: int = 1) -> Path:
    """A tiny Llama with ``rows`` head rows (tied to the embeddings or not)."""
    import torch

    tok = tokenizer()
    torch.manual_seed(seed)
    model = build_llama(size, rows, 64, eos_id=tok.eos_token_id)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(str(path))
    if with_tokenizer:
        tok.save_pretrained(str(path))
    return path


def qwen_pair(tmp_path: Path, student_rows: int = TOKENS, teacher_rows: int = 1024,
              **kw) -> tuple[Path, Path]:
    """Teacher with an untied head of teacher_rows, tied-embedding student of student_rows."""
    teacher = save_model(tmp_path / f"teacher{teacher_rows}", teacher_rows, tied=False,
                         size=ModelSize(48, 2, 2, 96), seed=2, **kw)
    student = save_model(tmp_path / f"student{student_rows}", student_rows, tied=True, **kw)
    return teacher, student


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(max_steps=3, warmup_steps=1, batch_size=2, seq_len=32, eval_every=0,
                eval_batches=1, progress=False, output=str(tmp_path / "run"), lr=1e-2,
                threads=1, cache_top_k=0)
    return TrainConfig(**{**base, **kw})


def prose(n: int, seed: int = 0) -> str:
    """n lines of varied English-like text (enough tokens for a few windows)."""
    words = ("the student reads the teacher soft labels and learns a smaller model of "
             "language from fewer tokens while the held out text measures it").split()
    return "\n".join(" ".join(words[(i * 7 + j * 3 + seed) % len(words)] for j in range(12))
                     for i in range(n)) + "\n"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path
