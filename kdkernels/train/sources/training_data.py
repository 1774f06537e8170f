"""A run's token streams: --data (user_data.py), or the embedded corpus (the standard
library's sources) with a BPE trained on it when no tokenizer is given; both cached under
the local cache, rank 0 building them and the other ranks reading its files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..batches import streams
from ..config import TrainConfig
from ..runtime import distributed
from . import tokenizer, user_data
from .local_cache import cache_root, content_key
from .stdlib_corpus import Corpus, stdlib_corpus


class TrainingData(NamedTuple):
    tok: Any  # the tokenizer given, or the one trained (and cached) on the training side
    train: torch.Tensor | streams.TokenStream
    held: torch.Tensor | streams.TokenStream
    key: str  # the data's cache key (the embedded teacher's cache is keyed by it)
    summary: str  # documents and tokens on each side, for the report


def prepare(cfg: TrainConfig, data: str | None, tok, world: distributed.World) -> TrainingData:
    """--data's streams, or the embedded corpus's."""
    if data:
        d = user_data.prepare(cfg, data, tok, world, cache_root())
        return TrainingData(d.tok, d.train, d.held, d.key, d.summary())
    texts = stdlib_corpus(cfg.corpus_max_mb, cfg.heldout_fraction)
    key = content_key({"source": texts.source, "python": sys.version, "mb": cfg.corpus_max_mb,
                       "heldout": cfg.heldout_fraction, "vocab": cfg.vocab_size,
                       "tok": None if tok is None else tok.name_or_path})
    cache = cache_root() / f"data-{key}"
    if world.is_main:  # rank 0 trains/encodes once; the others read its cache
        cache.mkdir(parents=True, exist_ok=True)
        first = tok if tok is not None else tokenizer.load_or_train(cache, texts.train,
                                                                     cfg.vocab_size)
        _tokens(first, texts.train, cache, "train")
        _tokens(first, texts.heldout, cache, "heldout")
    world.barrier()
    if tok is None:
        tok = tokenizer.load_or_train(cache, texts.train, cfg.vocab_size)
    train_ids = _tokens(tok, texts.train, cache, "train")
    held_ids = _tokens(tok, texts.heldout, cache, "heldout")
    return TrainingData(tok, train_ids, held_ids, key, _summary(texts, train_ids, held_ids))


def _tokens(tok, texts: list[str], cache: Path, name: str) -> torch.Tensor:
    path = cache / f"{name}-tokens.pt"
    if path.exists():
        return torch.load(path)
    ids = streams.encode_texts(tok, texts, tok.eos_token_id)
    torch.save(ids, path)
    return ids


def _summary(texts: Corpus, train_ids: torch.Tensor, held_ids: torch.Tensor) -> str:
    """The embedded corpus described like user data: files and tokens on each side."""
    return user_data.describe(texts.source, len(texts.train), len(texts.heldout), train_ids,
                              held_ids, unit="files")
