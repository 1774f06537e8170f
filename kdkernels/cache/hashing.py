"""Stable hashes that tie a cache to its tokenizer, teacher config and token stream."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

# Config fields that name where or how a model was saved or loaded, not what it computes.
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation",
                 "_attn_implementation_autoset", "attn_implementation", "name_or_path"}


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of a tokenizer's id mapping: its sorted (token, id) vocabulary, added tokens
    included, and its special tokens with their ids. Two tokenizers with equal hashes map
    every token string to the same id, so a cache can be paired with a student safely."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    specials = sorted({str(t) for t in getattr(tokenizer, "all_special_tokens", [])})
    special_ids = [[t, tokenizer.convert_tokens_to_ids(t)] for t in specials]
    return _sha({"vocab": vocab, "special_tokens": special_ids})


def config_hash(config) -> str:
    """sha256 of a Hugging Face config's fields, minus paths and library versions."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _sha({k: v for k, v in d.items() if k not in _CONFIG_NOISE})


def tokens_hash(ids: torch.Tensor) -> str:
    """sha256 of a token stream as little-endian int32 (what --data tokenised to)."""
    return hashlib.sha256(ids.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


def teacher_hash(teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> str:
    """sha256 of the teacher targets as stored (ids int32, log-probs in the cache dtype):
    a rerun of write_cache with other targets must not keep the old ones."""
    h = hashlib.sha256()
    for t in (teacher_ids, teacher_logprobs):
        h.update(str(t.dtype).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
