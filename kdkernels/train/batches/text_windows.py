"""Text windows tokenized by two tokenizers: the batches of a cross-tokenizer run.

A window is one span of text, cut on CHARACTERS (never on one side's tokens), so that the
student's and the teacher's tokens of a window cover exactly the same text:

- plain documents: ``window_chars`` characters from a seeded position of the training text
  (one document: a window that reaches its document's end stops there and gets the EOS,
  which is trained on); each side's sequence is ``BOS + the window's tokens (+ EOS)``, the
  BOS (the tokenizer's, else its EOS) read as context and never a label, so that every token
  of the text is predicted and scored;
- prompt/completion records: one record per sample (``kdkernels.uld.uld_inputs_from_text``:
  the prompt read, the completion and its EOS trained on, cut to ``seq_len`` tokens).

``window_chars`` is ``(seq_len - 2)`` times the fewer characters per token of the two
tokenizers on a sample of the training text, so most windows fill ``seq_len`` tokens on the
denser side; a window that still overflows either side is cut at the character where that
side's ``seq_len - 1``-th token ends and tokenized again (both sides), so both cover the same
shorter text.

A batch holds, per side, input ids, the loss's labels (unshifted, ``ignore_index`` outside
the answer span: the whole window, or the completion) and UTF-8 byte offsets from the
window's (completion's) first byte, right-padded to the side's longest row (the models are
causal, so padding after a row changes nothing before it; its labels are ignored): the
student's as ``input_ids``, ``labels`` (SHIFTED, ``[B, L - 1]``, as the other objectives and
the loop's token count read them), ``student_labels`` and ``student_offsets``; the teacher's
as ``teacher_input_ids``, ``teacher_labels``, ``teacher_offsets``. Training batches are a
pure function of (seed, step, micro-batch, rank), as windows.py's.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ...uld.text import byte_offsets, uld_inputs_from_text
from . import windows
from .streams import IGNORE_INDEX

_MAX_CUTS = 8  # re-tokenizations of one overflowing window before a hard cut


@dataclass(frozen=True)
class Side:
    """One tokenizer as the windows use it."""

    tok: Any
    bos: int
    eos: int
    pad: int
    byte_level: bool

    @classmethod
    def of(cls, tok, name: str) -> Side:
        if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
            raise ValueError(f"the {name}'s tokenizer must be a fast (Rust-backed) tokenizer: "
                             "the byte offsets that align the two tokenizations come from its "
                             f"character offsets; got {type(tok).__name__}")
        if tok.eos_token_id is None:
            raise ValueError(f"the {name}'s tokenizer has no EOS token; the windows end every "
                             "document with one")
        backend = tok.backend_tokenizer
        byte_level = "ByteLevel" in repr(backend.pre_tokenizer) or \
            "ByteLevel" in repr(backend.decoder)
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return cls(tok, bos, tok.eos_token_id, pad, byte_level)

    def encode(self, texts: list[str]) -> list[tuple[list[int], list]]:
        """(ids, character offsets) of each text, without special tokens."""
        if not texts:
            return []
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))

    def chars_per_token(self, texts: list[str]) -> float:
        n_tok = sum(len(ids) for ids, _ in self.encode(texts))
        return sum(len(t) for t in texts) / max(n_tok, 1)


@dataclass
class Windows:
    """Tokenized windows of both sides (lists, one entry per window)."""

    texts: list[str]
    ends: list[bool]  # whether the window ends its document (an EOS follows)
    student: list[tuple[list[int], list]] = field(default_factory=list)
    teacher: list[tuple[list[int], list]] = field(default_factory=list)

    def n_bytes(self) -> list[int]:
        return [len(t.encode("utf-8")) for t in self.texts]


def _cut_to_fit(texts: list[str], ends: list[bool], sides: tuple[Side, Side],
                seq_len: int) -> Windows:
    """Tokenize every window on both sides; windows longer than seq_len on a side (BOS and
    EOS included) are cut on a character and tokenized again, until both sides fit."""
    texts, ends = list(texts), list(ends)
    encoded: list[list] = [[None] * len(texts), [None] * len(texts)]
    pending = list(range(len(texts)))
    for attempt in range(_MAX_CUTS + 1):
        if not pending:
            break
        batch = [texts[i] for i in pending]
        per_side = [side.encode(batch) for side in sides]
        redo = []
        for j, i in enumerate(pending):
            cut = None
            for s, (ids, offs) in enumerate(e[j] for e in per_side):
                encoded[s][i] = (ids, offs)
                if 1 + len(ids) + int(ends[i]) <= seq_len:  # BOS + tokens (+ EOS) fit
                    continue
                if 1 + len(ids) <= seq_len:  # only the EOS is too many: the text stays
                    ends[i] = False
                    continue
                end = offs[seq_len - 2][1]  # the seq_len - 1 -th token's last character
                cut = end if cut is None else min(cut, end)
            if cut is None:
                continue
            if attempt == _MAX_CUTS or cut <= 0 or cut >= len(texts[i]):
                cut = max(1, int(len(texts[i]) * 0.8))  # no progress on characters: shrink
                if cut >= len(texts[i]):
                    raise ValueError(f"a one-character window takes more than --seq-len "
                                     f"{seq_len} tokens; use a longer --seq-len")
            texts[i], ends[i] = texts[i][:cut], False
            redo.append(i)
        pending = redo
    if pending:
        raise ValueError(f"could not cut {len(pending)} text windows to --seq-len {seq_len} "
                         "tokens on both sides; use a longer --seq-len")
    return Windows(texts, ends, encoded[0], encoded[1])


def _side_rows(side: Side, win: Windows, which: int) -> list[tuple[list, list, list]]:
    """(ids, unshifted labels, byte offsets) per window: BOS, the text's tokens, the EOS where
    the document ends (zero-width at the text's last byte)."""
    rows = []
    for k, (text, ends) in enumerate(zip(win.texts, win.ends, strict=True)):
        ids, char_offs = (win.student, win.teacher)[which][k]
        pieces = side.tok.convert_ids_to_tokens(list(ids))
        offs = byte_offsets(text, list(char_offs), pieces, side.byte_level)
        ids, labels = [side.bos, *ids], [IGNORE_INDEX, *ids]
        offs = [(0, 0), *offs]
        if ends:
            n = len(text.encode("utf-8"))
            ids, labels, offs = ids + [side.eos], labels + [side.eos], offs + [(n, n)]
        rows.append((ids, labels, offs))
    return rows


def _pad(rows: list[tuple[list, list, list]], pad: int) -> dict[str, torch.Tensor]:
    B, L = len(rows), max(len(r[0]) for r in rows)
    ids = torch.full((B, L), pad, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    offsets = torch.zeros((B, L, 2), dtype=torch.long)
    for b, (i, lab, off) in enumerate(rows):
        ids[b, :len(i)] = torch.tensor(i, dtype=torch.long)
        labels[b, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        offsets[b, :len(off)] = torch.tensor(off, dtype=torch.long).reshape(len(off), 2)
    return {"input_ids": ids, "labels": labels, "offsets": offsets}


def assemble(win: Windows, sides: tuple[Side, Side]) -> dict[str, torch.Tensor]:
    """The batch of some tokenized windows (the module docstring names the keys)."""
    s = _pad(_side_rows(sides[0], win, 0), sides[0].pad)
    t = _pad(_side_rows(sides[1], win, 1), sides[1].pad)
    return {"input_ids": s["input_ids"], "labels": s["labels"][:, 1:],
            "student_labels": s["labels"], "student_offsets": s["offsets"],
            "teacher_input_ids": t["input_ids"], "teacher_labels": t["labels"],
            "teacher_offsets": t["offsets"]}


def records_batch(prompts: list[str], completions: list[str], sides: tuple[Side, Side],
                  seq_len: int) -> dict[str, torch.Tensor]:
    """The batch of prompt/completion records (uld_inputs_from_text, cut to seq_len)."""
    enc = uld_inputs_from_text(prompts, completions, sides[0].tok, sides[1].tok,
                               max_length=seq_len, return_vocab_map=False)
    return {"input_ids": enc["student_input_ids"], "labels": enc["student_labels"][:, 1:],
            "student_labels": enc["student_labels"], "student_offsets": enc["student_offsets"],
            "teacher_input_ids": enc["teacher_input_ids"],
            "teacher_labels": enc["teacher_labels"], "teacher_offsets": enc["teacher_offsets"]}


def covered_bytes(batch: dict[str, torch.Tensor], side: str) -> int:
    """UTF-8 bytes of the text a batch's labelled tokens cover on one side: per row, the end
    of its last labelled token's byte span (offsets count from the span's first byte)."""
    labels, offs = batch[f"{side}_labels"], batch[f"{side}_offsets"]
    ends = offs[..., 1].masked_fill(labels == IGNORE_INDEX, 0)
    return int(ends.max(dim=1).values.sum())


@dataclass
class HeldOut:
    """Fixed held-out windows, the same text for every model: each side's (input_ids,
    shifted labels) batches for heldout_ce, and the bytes they cover."""

    student: list[tuple[torch.Tensor, torch.Tensor]]
    teacher: list[tuple[torch.Tensor, torch.Tensor]]
    student_bytes: int
    teacher_bytes: int
    windows: int

    @staticmethod
    def tokens(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        return sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)


def _generator(*key: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(("text windows", *key)).encode()))
    return g


class TextWindows:
    """Training and held-out windows of documents for a student and a teacher tokenizer.

    docs: (prompt, text) pairs; all prompts empty: plain text windows; else one record per
    sample (the prompt read, the text trained on)."""

    def __init__(self, docs: list[tuple[str, str]], student_tok, teacher_tok, seq_len: int, *,
                 window_chars: int | None = None) -> None:
        if seq_len < 4:
            raise ValueError(f"--seq-len must be >= 4 for text windows; got {seq_len}")
        self.sides = (Side.of(student_tok, "student"), Side.of(teacher_tok, "teacher"))
        self.seq_len = seq_len
        self.records = any(p for p, _ in docs)
        self.prompts = [p for p, _ in docs]
        self.texts = [t for _, t in docs if t] if not self.records else [t for _, t in docs]
        if not self.texts:
            raise ValueError("no training text: every document is empty")
        self.starts = [0]
        for t in self.texts:
            self.starts.append(self.starts[-1] + len(t))
        self.window_chars = window_chars or self._window_chars()

    def _window_chars(self) -> int:
        """(seq_len - 2) x the fewer characters per token of the two sides on a sample of
        the training text (its first 200,000 characters)."""
        sample, n = [], 0
        for t in self.texts:
            sample.append(t[:200_000 - n])
            n += len(sample[-1])
            if n >= 200_000:
                break
        cpt = min(side.chars_per_token(sample) for side in self.sides)
        return max(1, int((self.seq_len - 2) * cpt))

    @property
    def total_chars(self) -> int:
        return self.starts[-1]

    def describe(self) -> str:
        if self.records:
            return (f"{len(self.texts)} prompt/completion records, one per row, cut to "
                    f"{self.seq_len} tokens per side")
        return (f"windows of up to {self.window_chars:,} characters ({self.seq_len} tokens on "
                f"the denser side; cut on characters, the same text for both tokenizers) from "
                f"{len(self.texts)} documents, {self.total_chars:,} characters")

    def _window(self, start: int, width: int) -> tuple[str, bool]:
        """The text from a global character position: ``width`` characters or the rest of
        its document (then it ends the document)."""
        d = bisect.bisect_right(self.starts, start) - 1
        local = start - self.starts[d]
        text = self.texts[d]
        return text[local:local + width], local + width >= len(text)

    def batch_of(self, spans: list[tuple[str, bool]]) -> dict[str, torch.Tensor]:
        win = _cut_to_fit([s for s, _ in spans], [e for _, e in spans], self.sides,
                          self.seq_len)
        return assemble(win, self.sides)

    def train_batch(self, batch_size: int, seq_len: int, *, seed: int, step: int,
                    micro: int = 0, rank: int = 0, grad_accum: int = 1,
                    world_size: int = 1) -> dict[str, torch.Tensor]:
        """One micro-batch (the loop's data interface), a function of its arguments only."""
        if seq_len != self.seq_len:
            raise ValueError(f"these windows were cut for --seq-len {self.seq_len}, not "
                             f"{seq_len}")
        if self.records:
            idx = torch.randint(0, len(self.texts), (batch_size,),
                                generator=_generator(seed, step, micro, rank)).tolist()
            return records_batch([self.prompts[i] for i in idx], [self.texts[i] for i in idx],
                                 self.sides, self.seq_len)
        width = min(self.window_chars, self.total_chars - 1)
        starts = windows.window_starts(self.total_chars, batch_size, width, seed=seed,
                                       step=step, micro=micro, rank=rank)
        return self.batch_of([self._window(s, width) for s in starts])

    def heldout(self, docs: list[tuple[str, str]], batch_size: int,
                n_batches: int) -> HeldOut:
        """Up to batch_size x n_batches fixed windows of the held-out documents (evenly
        spread; records: the first ones), the same for every model."""
        held = TextWindows(docs, self.sides[0].tok, self.sides[1].tok, self.seq_len,
                           window_chars=self.window_chars)
        n = batch_size * n_batches
        if held.records:
            picks = list(range(min(n, len(held.texts))))
            batches = [records_batch([held.prompts[i] for i in picks[k:k + batch_size]],
                                     [held.texts[i] for i in picks[k:k + batch_size]],
                                     self.sides, self.seq_len)
                       for k in range(0, len(picks), batch_size)]
        else:
            width = min(self.window_chars, held.total_chars)
            starts = windows.eval_starts(held.total_chars, batch_size, width, n_batches)
            spans = [held._window(s, width) for s in starts]
            batches = [self.batch_of(spans[k:k + batch_size])
                       for k in range(0, len(spans), batch_size)]
        if not batches or not any(bool((b["labels"] != IGNORE_INDEX).any()) for b in batches):
            raise ValueError("the held-out split holds no text to score; use more held-out "
                             "data (--heldout-fraction)")
        return HeldOut(
            student=[(b["input_ids"], b["labels"]) for b in batches],
            teacher=[(b["teacher_input_ids"], b["teacher_labels"][:, 1:]) for b in batches],
            student_bytes=sum(covered_bytes(b, "student") for b in batches),
            teacher_bytes=sum(covered_bytes(b, "teacher") for b in batches),
            windows=sum(b["input_ids"].shape[0] for b in batches))
