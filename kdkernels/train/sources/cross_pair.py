"""A teacher and a student with different tokenizers (`kdk distill --teacher DIR --student DIR`,
or `--preset cross-tokenizer`): the mode of the cross-tokenizer loss, the vocabulary map, the
text windows both sides read, the held-out windows and the teacher's held-out bits per byte.

The mode (--cross-tokenizer): ``hybrid`` (GOLD's hybrid: generalized JSD on the token strings
both vocabularies share, sorted L1 on the rest) or ``uld`` (the sorted L1 over everything).
Default: hybrid when the vocabularies overlap by more than half, overlap being the share of
the teacher's vocabulary (its tokenizer's entries) whose token string is also a student token
(``kdkernels.uld.build_vocab_map``, exact string match as GOLD's); else uld.

Decisions: --cross-tokenizer / --merge with two models that share one tokenizer are refused
(the exact token-level KD loss runs there, which ULD only approximates); so are they without
--teacher/--student (the embedded default, --teacher-cache, --teacher-url), except for
--preset cross-tokenizer. --cross-tokenizer hybrid when no token string is shared is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...data import documents
from ...hf import models
from ...uld.align import MERGES
from ...uld.vocab import build_vocab_map
from ..batches.text_windows import HeldOut, TextWindows
from ..config import TrainConfig
from ..objectives.cross_tokenizer import HYBRID, MODES, ULD
from ..runtime import bits_per_byte
from . import split
from .stdlib_corpus import stdlib_corpus

LABELS = {ULD: "student, ULD (fused, cross-tokenizer)",
          HYBRID: "student, GOLD hybrid (fused, cross-tokenizer)"}


def differ(student_tok, teacher_tok) -> bool:
    """Whether two tokenizers (both given) map tokens to ids differently."""
    if student_tok is None or teacher_tok is None:
        return False
    return student_tok.get_vocab() != teacher_tok.get_vocab()


def check_options(cfg: TrainConfig) -> None:
    """Refusals of options the cross-tokenizer path cannot honour, each naming its flag."""
    if cfg.cross_tokenizer is not None and cfg.cross_tokenizer not in MODES:
        raise ValueError(f"--cross-tokenizer must be one of {', '.join(MODES)}; got "
                         f"{cfg.cross_tokenizer!r}")
    if cfg.merge is not None and cfg.merge not in MERGES:
        raise ValueError(f"--merge must be one of {', '.join(MERGES)}; got {cfg.merge!r}")
    if cfg.baseline == "naive":
        raise ValueError("--baseline naive compares the fused dense KD loss with materialised "
                         "logits over one vocabulary; a cross-tokenizer run has no such "
                         "yardstick: drop --baseline naive")
    if cfg.on_policy or cfg.seq_kd:
        raise ValueError("--on-policy/--seq-kd generate token sequences that the teacher must "
                         "score in the same vocabulary; with different tokenizers, drop them")
    if cfg.divergence != "forward_kl":
        raise ValueError(f"--divergence {cfg.divergence}: a cross-tokenizer run's loss is ULD "
                         "or GOLD's hybrid (--cross-tokenizer uld|hybrid; --beta is the "
                         "hybrid's JSD beta), not a token-level divergence: drop --divergence")


def refuse_flags(cfg: TrainConfig, why: str) -> None:
    """--cross-tokenizer / --merge given to a run that is not across tokenizers."""
    given = [f for f, v in (("--cross-tokenizer", cfg.cross_tokenizer), ("--merge", cfg.merge))
             if v is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} "
                         f"to a teacher and a student with different tokenizers; {why}: drop "
                         f"{' and '.join(given)}")


def choose_mode(requested: str | None, matched: int, teacher_vocab: int) -> tuple[str, str]:
    """(mode, why) from --cross-tokenizer and the overlap (matched / teacher vocabulary)."""
    share = matched / max(teacher_vocab, 1)
    overlap = (f"{matched:,} of the teacher's {teacher_vocab:,} tokens ({share:.1%}) are also "
               "student tokens")
    if requested is None:
        mode = HYBRID if share > 0.5 else ULD
        return mode, f"default ({overlap}; hybrid above 50%)"
    if requested == HYBRID and matched == 0:
        raise ValueError("--cross-tokenizer hybrid matches the token strings the two "
                         "vocabularies share, and these share none; use --cross-tokenizer uld")
    return requested, f"--cross-tokenizer {requested} ({overlap})"


def check_heads(student: nn.Module, teacher: nn.Module, student_tok, teacher_tok) -> None:
    """Each tokenizer must fit its own model: heads (and the student's input embeddings) may
    be padded beyond their tokenizer, never smaller."""
    short = []
    for who, tok, model in (("student", student_tok, student), ("teacher", teacher_tok, teacher)):
        n = max(max(tok.get_vocab().values(), default=-1) + 1, len(tok))
        rows = models.rows(models.head(model)[0])
        if rows < n:
            short.append(f"the {who}'s tokenizer has {n} tokens but its head {rows} rows")
    emb = student.get_input_embeddings()
    n = len(student_tok)
    if emb is not None and models.rows(emb.weight) < n:
        short.append(f"the student's tokenizer has {n} tokens but its input embeddings "
                     f"{models.rows(emb.weight)} rows")
    if short:
        raise ValueError("; ".join(short) + " (padded vocabularies may be larger, never smaller)")


def documents_of(cfg: TrainConfig, data: str | None) -> tuple[list, list, str]:
    """(train, held-out) (prompt, text) documents of --data, or of the embedded corpus, and
    the source's name."""
    split.check_fraction(cfg.heldout_fraction)
    if data:
        docs = documents.read(data, text_field=cfg.text_field, max_mb=cfg.corpus_max_mb)
        train, held = split.split(docs.docs, cfg.heldout_fraction)
        note = "; stopped reading at the --corpus-max-mb budget" if docs.truncated else ""
        return ([(d.prompt, d.text) for d in train], [(d.prompt, d.text) for d in held],
                docs.source + note)
    texts = stdlib_corpus(cfg.corpus_max_mb, cfg.heldout_fraction)
    return [("", t) for t in texts.train], [("", t) for t in texts.heldout], texts.source


@dataclass
class CrossInputs:
    """What a cross-tokenizer run needs beyond the models."""

    mode: str
    why: str
    merge: str
    vocab_map: torch.Tensor  # [teacher head rows]: student id or -1 (hybrid mode reads it)
    matched: int
    windows: TextWindows
    held: HeldOut
    student_tok: Any
    teacher_tok: Any
    summary: str

    @property
    def label(self) -> str:
        return LABELS[self.mode]

    def describe(self) -> str:
        return (f"{self.mode} loss, {self.why}; merge {self.merge}; student vocabulary "
                f"{len(self.student_tok):,}, teacher {len(self.teacher_tok):,}")

    def finish(self, summary: dict[str, Any], name: str) -> None:
        """A student's summary: its held-out bits per byte (from the loop's final held-out
        CE on the same windows) and, for the distilled one, its label."""
        if summary.get("heldout_ce") is not None:
            summary["bits_per_byte"] = bits_per_byte.from_mean_ce(
                summary["heldout_ce"], self.held.student, self.held.student_bytes)
        if name == "kd":
            summary["label"] = self.label

    def teacher_summary(self, teacher: nn.Module, device: torch.device,
                        autocast: bool = False) -> dict[str, Any]:
        """The teacher's row: held-out CE on its own tokens of the held-out windows, bits
        per byte."""
        out = bits_per_byte.heldout_bits_per_byte(teacher, self.held.teacher,
                                                  self.held.teacher_bytes, device, autocast)
        out.update(params=sum(p.numel() for p in teacher.parameters()), steps=0, cached=False)
        return out


def build(cfg: TrainConfig, student_tok, teacher_tok, teacher_rows: int, train_docs: list,
          held_docs: list, source: str, *, mode: str | None = None) -> CrossInputs:
    """The windows, held-out set, vocabulary map and mode (``mode``: forced, else
    --cross-tokenizer or the overlap's default)."""
    vocab_map = build_vocab_map(student_tok, teacher_tok, teacher_rows)
    matched = int((vocab_map >= 0).sum())
    chosen, why = choose_mode(mode or cfg.cross_tokenizer, matched, len(teacher_tok))
    wins = TextWindows(train_docs, student_tok, teacher_tok, cfg.seq_len)
    held = wins.heldout(held_docs, cfg.batch_size, cfg.eval_batches)
    chars = sum(len(t) for _, t in train_docs)
    summary = (f"{source}: train {len(train_docs)} documents, {chars:,} characters; held-out "
               f"{len(held_docs)} documents, {held.windows} windows of {held.student_bytes:,} "
               f"bytes ({HeldOut.tokens(held.student):,} student tokens, "
               f"{HeldOut.tokens(held.teacher):,} teacher tokens); {wins.describe()}")
    return CrossInputs(chosen, why, cfg.merge or "observed", vocab_map, matched, wins, held,
                       student_tok, teacher_tok, summary)
