"""The bytes of each token of a local tokenizer, to read an API that answers in token strings.

Hosted APIs return generated tokens as strings (and their UTF-8 bytes), never ids. To train on
them we need the local ids: a top-logprob's string maps to the id whose bytes it is, and the
generated text is re-tokenised locally and must split into the same pieces, or the student
would be paired with distributions the teacher gave for other tokens.

Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, the embedded BPE) spell each byte as one
printable character (GPT-2's bytes_to_unicode): mapped back exactly. SentencePiece-style pieces
spell a space as U+2581 and raw bytes as ``<0xNN>``. Special and added tokens have no bytes: a
text never round-trips to them and no top-logprob string maps to one.
"""

from __future__ import annotations

import re
from functools import lru_cache

_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SP_SPACE = "\u2581"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable character of each byte, inverted (its bytes_to_unicode)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


class TokenPieces:
    """bytes_of[id] (None for special/added tokens or pieces that cannot be read) and the
    inverse map from bytes to the id that spells them (bytes spelled by two ids: unmapped)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = set(getattr(tokenizer, "get_added_vocab", dict)().values())
        size = max(vocab.values()) + 1 if vocab else 0
        self.bytes_of: list[bytes | None] = [None] * size
        byte_level = _is_byte_level(tokenizer)
        decoder = _byte_decoder()
        for piece, i in vocab.items():
            if i in special or i in added:
                continue
            self.bytes_of[i] = _bytes(piece, byte_level, decoder)
        self.id_of: dict[bytes, int] = {}
        twice: set[bytes] = set()
        for i, b in enumerate(self.bytes_of):
            if b is None:
                continue
            if b in self.id_of:
                twice.add(b)
            self.id_of.setdefault(b, i)
        for b in twice:
            del self.id_of[b]

    def encode(self, text: str) -> list[int]:
        """The local tokenisation of a generated text (no special tokens added, none read)."""
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False,
                                   split_special_tokens=True)["input_ids"])


def _bytes(piece: str, byte_level: bool, decoder: dict[str, int]) -> bytes | None:
    if byte_level:
        try:
            return bytes(decoder[c] for c in piece)
        except KeyError:  # a piece outside the byte alphabet: not a byte-level token
            return None
    if m := _SP_BYTE.fullmatch(piece):
        return bytes([int(m.group(1), 16)])
    return piece.replace(_SP_SPACE, " ").encode("utf-8")
