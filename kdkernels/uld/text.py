"""Inputs of the cross-tokenizer loss from prompt / completion text, for both tokenizers.

Each side's sequence is ``prompt tokens + completion tokens + EOS``. The completion is tokenized
on its own (so no token straddles the prompt boundary and both sides share one byte coordinate:
the completion's UTF-8 bytes). Its tokens carry byte offsets relative to the completion's start,
converted from a fast tokenizer's character offsets; where several tokens share a character (a
byte-level BPE splitting a multibyte character, or byte-fallback pieces) the span is divided by
the pieces' byte lengths, so both tokenizations of accented, CJK or emoji text still meet at
common byte boundaries. The EOS gets the zero-width span ``(n_bytes, n_bytes)``; prompt and
padding positions get ``(0, 0)`` (their labels are ``ignore_index``, so the loss never reads
them).

Prompt rendering (``chat_template``):

* ``None``: the prompt text as given, tokenized with the tokenizer's special tokens (its BOS),
  a trailing EOS removed (GOLD's ``build_teacher_inputs_from_texts``).
* ``"own"``: each side renders the prompt with its own chat template
  (``apply_chat_template(..., add_generation_prompt=True)``); each model sees the format it
  was trained on.
* ``"student"``: GOLD's choice: the student's chat template renders the prompt for both sides
  and the teacher tokenizes that text (with its special tokens, as GOLD does).

A prompt is a string (a single user message under a chat template) or a list of messages.
"""

from __future__ import annotations

import re

import torch

CHAT_TEMPLATES = (None, "own", "student")
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte (each char of a ByteLevel piece is a byte)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_OF = _bytes_to_unicode()


def _is_byte_level(tokenizer) -> bool:
    backend = tokenizer.backend_tokenizer
    return "ByteLevel" in repr(backend.pre_tokenizer) or "ByteLevel" in repr(backend.decoder)


def _piece_bytes(piece: str, byte_level: bool) -> int | None:
    """Bytes a token piece stands for, where the piece says (else None)."""
    if byte_level and piece and all(ch in _BYTE_OF for ch in piece):
        return len(piece)
    if _BYTE_FALLBACK.match(piece):
        return 1
    return None


def byte_offsets(text: str, char_offsets: list, pieces: list[str],
                 byte_level: bool) -> list[tuple[int, int]]:
    """UTF-8 byte ``(start, end)`` per token from character offsets into ``text``; never
    decreasing, shared characters split by the pieces' byte lengths, a token without
    characters zero-width at the previous token's end (as TRL's ``encode_with_byte_offsets``)."""
    cum = [0]
    for ch in text:
        cum.append(cum[-1] + len(ch.encode("utf-8")))
    out = []
    cursor = 0
    for (cs, ce), piece in zip(char_offsets, pieces, strict=True):
        if cs == ce:  # no characters (e.g. whitespace trimmed away): zero width where we are
            out.append((cursor, cursor))
            continue
        bs, be = cum[cs], cum[ce]
        start = max(bs, cursor)
        n = _piece_bytes(piece, byte_level)
        end = start + n if n is not None and start + n <= be else max(be, start)
        out.append((start, end))
        cursor = end
    return out


def _check_tokenizer(name: str, tok) -> None:
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise TypeError(f"{name} must be a fast (Rust-backed) tokenizer: the byte offsets come "
                        f"from its character offsets; got {type(tok).__name__}")


def _messages(prompt) -> list:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _render(tok, name: str, prompt) -> str:
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{name} has no chat_template: use chat_template=None or give it one")
    return tok.apply_chat_template(_messages(prompt), add_generation_prompt=True,
                                   tokenize=False)


def _side(tok, rendered, completions, *, special, max_length, add_eos, ignore_index):
    """Per sample: (ids, labels, offsets) lists for one tokenizer."""
    byte_level = _is_byte_level(tok)
    eos = tok.eos_token_id
    if not completions:
        return []
    enc = tok(list(completions), add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for i, completion in enumerate(completions):
        text = rendered[i]
        prompt_ids = tok(text, add_special_tokens=special)["input_ids"]
        if special and eos is not None and prompt_ids and prompt_ids[-1] == eos:
            prompt_ids = prompt_ids[:-1]  # GOLD: a completion extends the prompt
        ids = list(enc["input_ids"][i])
        offs = byte_offsets(completion, enc["offset_mapping"][i],
                            tok.convert_ids_to_tokens(ids), byte_level)
        if add_eos and eos is not None:
            n_bytes = len(completion.encode("utf-8"))
            ids.append(eos)
            offs.append((n_bytes, n_bytes))
        seq = list(prompt_ids) + ids
        lab = [ignore_index] * len(prompt_ids) + ids
        off = [(0, 0)] * len(prompt_ids) + offs
        if max_length is not None and len(seq) > max_length:
            # the prompt goes first, from its start; then the completion loses its end
            cut = min(len(prompt_ids), len(seq) - max_length)
            seq, lab, off = seq[cut:], lab[cut:], off[cut:]
            seq, lab, off = seq[:max_length], lab[:max_length], off[:max_length]
        rows.append((seq, lab, off))
    return rows


def _pad(rows, pad_id: int, ignore_index: int) -> dict[str, torch.Tensor]:
    L = max((len(r[0]) for r in rows), default=0)
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), ignore_index, dtype=torch.long)
    offsets = torch.zeros((B, L, 2), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for b, (seq, lab, off) in enumerate(rows):
        n = len(seq)
        if n:
            ids[b, :n] = torch.tensor(seq)
            labels[b, :n] = torch.tensor(lab)
            offsets[b, :n] = torch.tensor(off, dtype=torch.long).reshape(n, 2)
            mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "offsets": offsets, "attention_mask": mask}


def uld_inputs_from_text(
    prompts, completions, student_tokenizer, teacher_tokenizer, *,
    max_length: int | None = None, chat_template: str | None = None, add_eos: bool = True,
    ignore_index: int = -100, return_vocab_map: bool = True,
    teacher_vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Token ids, labels and completion byte offsets of prompt/completion pairs, both sides.

    Returns ``student_input_ids``, ``student_labels``, ``student_offsets``,
    ``student_attention_mask`` and the same four ``teacher_*`` (right-padded to the side's
    longest; labels ``ignore_index`` outside the completion and its EOS; offsets ``[B, L, 2]``
    in UTF-8 bytes from the completion's start), ``completion_bytes`` ``[B]`` (for bits per
    byte), and with ``return_vocab_map`` the hybrid loss's ``vocab_map``
    (``build_vocab_map(student_tokenizer, teacher_tokenizer, teacher_vocab_size)``).
    ``max_length`` cuts each side to that many tokens: the prompt from its start first, then
    the completion's end (its EOS, then its last tokens). See the module docstring for
    ``chat_template``."""
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be lists (one entry per sample)")
    prompts, completions = list(prompts), list(completions)
    if len(prompts) != len(completions):
        raise ValueError(f"prompts has {len(prompts)} entries, completions {len(completions)}: "
                         "they must pair up")
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise TypeError(f"completions[{i}] must be a str, got {type(c).__name__}")
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template must be one of None, 'own', 'student'; "
                         f"got {chat_template!r}")
    if max_length is not None and (isinstance(max_length, bool)
                                   or not isinstance(max_length, int) or max_length <= 0):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    _check_tokenizer("student_tokenizer", student_tokenizer)
    _check_tokenizer("teacher_tokenizer", teacher_tokenizer)
    if chat_template is None:
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a str without a chat_template, got "
                                f"{type(p).__name__}")
        s_text, t_text = prompts, prompts
        s_special = t_special = True
    elif chat_template == "own":
        s_text = [_render(student_tokenizer, "student_tokenizer", p) for p in prompts]
        t_text = [_render(teacher_tokenizer, "teacher_tokenizer", p) for p in prompts]
        s_special = t_special = False
    else:
        s_text = [_render(student_tokenizer, "student_tokenizer", p) for p in prompts]
        t_text = s_text
        s_special, t_special = False, True
    out: dict[str, torch.Tensor] = {}
    for side, tok, text, special in (("student", student_tokenizer, s_text, s_special),
                                     ("teacher", teacher_tokenizer, t_text, t_special)):
        rows = _side(tok, text, completions, special=special, max_length=max_length,
                     add_eos=add_eos, ignore_index=ignore_index)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        for key, value in _pad(rows, pad_id, ignore_index).items():
            out[f"{side}_{key}"] = value
    out["completion_bytes"] = torch.tensor([len(c.encode("utf-8")) for c in completions],
                                           dtype=torch.long)
    if return_vocab_map:
        from .vocab import build_vocab_map

        out["vocab_map"] = build_vocab_map(student_tokenizer, teacher_tokenizer,
                                           teacher_vocab_size)
    return out
