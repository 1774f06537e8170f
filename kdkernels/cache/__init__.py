"""Teacher-logit cache: a teacher's sparse targets (top-K or sampled ids and log-probs per
position) in verified safetensors shards, written resumably and read as a torch Dataset."""

from __future__ import annotations

from .dataset import TeacherCache
from .format import FORMAT_VERSION, MANIFEST, read_manifest
from .hashing import tokenizer_hash
from .writer import CacheWriter, write_cache

__all__ = ["FORMAT_VERSION", "MANIFEST", "CacheWriter", "TeacherCache", "read_manifest",
           "tokenizer_hash", "write_cache"]
