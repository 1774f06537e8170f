"""--data end to end: documents -> held-out split -> tokenizer (given, or trained on the
training side) -> token streams, cached under the kdkernels cache by the documents' content
(editing a file changes the key) and the tokenizer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...data import documents
from ..batches import streams
from ..config import TrainConfig
from ..runtime import distributed
from . import split, tokenizer

FORMAT = 2  # bump when the cached streams change meaning


@dataclass
class Prepared:
    tok: Any
    train: torch.Tensor | streams.TokenStream
    held: torch.Tensor | streams.TokenStream
    key: str
    docs: documents.Documents
    n_train: int  # documents on each side
    n_held: int

    @property
    def source(self) -> str:
        return self.docs.source

    def summary(self) -> str:
        """Documents and tokens on each side (and what the loss trains on), for the report."""
        return describe(self.source, self.n_train, self.n_held, self.train, self.held,
                        truncated=self.docs.truncated, skipped=self.docs.skipped_empty)


def _tokens(t: torch.Tensor | streams.TokenStream, use: str) -> str:
    if isinstance(t, streams.TokenStream):
        return f"{t.numel():,} tokens ({t.trained():,} completion tokens {use})"
    return f"{t.numel():,} tokens"


def describe(source: str, n_train: int, n_held: int, train, held, *, truncated: bool = False,
             skipped: int = 0, unit: str = "documents") -> str:
    extra = ""
    if truncated:
        extra += "; stopped reading at the --corpus-max-mb budget"
    if skipped:
        extra += f"; {skipped} empty records skipped"
    return (f"{source}: train {n_train} {unit}, {_tokens(train, 'trained on')}; held-out "
            f"{n_held} {unit}, {_tokens(held, 'scored')}{extra}")


def _key(cfg: TrainConfig, docs: documents.Documents, tok) -> str:
    from ...cache.hashing import tokenizer_hash

    ident = {"format": FORMAT, "docs": docs.digest, "heldout": cfg.heldout_fraction,
             "vocab": cfg.vocab_size, "tok": None if tok is None else tokenizer_hash(tok)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _save(path: Path, t: torch.Tensor | streams.TokenStream) -> None:
    torch.save(t.to_dict() if isinstance(t, streams.TokenStream) else t, path)


def _load(path: Path) -> torch.Tensor | streams.TokenStream:
    obj = torch.load(path)
    return streams.TokenStream.from_dict(obj) if isinstance(obj, dict) else obj


def prepare(cfg: TrainConfig, path: str, tok, world: distributed.World,
            cache_root: Path) -> Prepared:
    """Read, split, tokenise (rank 0; the other ranks read its cache) and return both sides."""
    split.check_fraction(cfg.heldout_fraction)
    docs = documents.read(path, text_field=cfg.text_field, max_mb=cfg.corpus_max_mb)
    train_docs, held_docs = split.split(docs.docs, cfg.heldout_fraction)
    key = _key(cfg, docs, tok)
    cache = cache_root / f"data-{key}"
    train_path, held_path = cache / "train-tokens.pt", cache / "heldout-tokens.pt"
    if world.is_main and not (train_path.exists() and held_path.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        first = tok if tok is not None else tokenizer.load_or_train(
            cache, [d.prompt + d.text for d in train_docs], cfg.vocab_size)
        for docs_side, out in ((train_docs, train_path), (held_docs, held_path)):
            tmp = out.with_suffix(".tmp")
            _save(tmp, streams.encode(first, docs_side, first.eos_token_id))
            tmp.replace(out)  # a killed run leaves no half-written stream behind
    world.barrier()
    if tok is None:
        tok = tokenizer.load_or_train(cache, [], cfg.vocab_size)
    return Prepared(tok, _load(train_path), _load(held_path), key, docs, len(train_docs),
                    len(held_docs))
