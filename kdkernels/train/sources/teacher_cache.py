"""--teacher-cache: the student (--student, or the embedded one on the embedded tokenizer)
and a cache it can learn from (the same tokenizer, ids within its head), the cache's training
sequences, the held-out windows, and the cache's facts for the report."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..batches import streams
from ..batches.cache_data import CacheData
from ..config import TrainConfig
from ..runtime import distributed
from . import embedded_cache, tiny_llama, training_data


@dataclass
class CacheInputs:
    student: torch.nn.Module  # the initial weights
    tok: Any
    data: CacheData
    held: list  # held-out batches
    summary: str  # where the held-out and training tokens come from, for the report


def seq_len(path: str) -> int:
    """The sequence length of the cache at path (the default --seq-len with a cache)."""
    from ...cache import read_manifest

    return int(read_manifest(Path(path))["seq_len"])


def identity(path: str) -> dict[str, Any]:
    """What --resume must find unchanged in the cache at path."""
    from ...cache import read_manifest

    return cache_identity(path, read_manifest(Path(path)))


def open_inputs(cfg: TrainConfig, cache_path: str, student_path: str | None,
                data: str | None, world: distributed.World) -> CacheInputs:
    """The student, its tokenizer, the cache's batches and the held-out windows. Held-out
    text: --data's held-out files; else the embedded corpus's held-out files for the
    embedded student; else the cache's last heldout_fraction of sequences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = None
    if student_path is None:
        texts = training_data.prepare(cfg, None, None, world)
        tok = texts.tok
        torch.manual_seed(cfg.seed)
        student0 = tiny_llama.build_llama(cfg.student_size, len(tok), cfg.seq_len,
                                          eos_id=tok.eos_token_id)
        name = "the embedded default student (no --student)"
    else:
        torch.manual_seed(cfg.seed)
        student0 = AutoModelForCausalLM.from_pretrained(student_path)
        try:
            tok = AutoTokenizer.from_pretrained(student_path)
        except (OSError, ValueError):
            tok = None  # refused by check_student: a cache is only paired through tokenizers
        name = f"--student {student_path}"
    own_heldout = student_path is not None and data is None
    cache = CacheData.open(cache_path, heldout_fraction=cfg.heldout_fraction if own_heldout
                           else 0.0)
    check_student(cache.cache, student0, tok, name)
    cache.check_seq_len(cfg.seq_len)
    if data is not None:
        texts = training_data.prepare(cfg, data, tok, world)
    if texts is not None:
        held = streams.eval_batches(texts.held, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        summary = f"held-out from {texts.summary}; training tokens from the teacher cache"
    else:
        held = cache.heldout_batches(cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        summary = (f"teacher cache {cache_path}: {len(cache.train)} training / "
                   f"{len(cache.held)} held-out sequences (the last ones)")
    return CacheInputs(student0, tok, cache, held, summary)


def facts(data: CacheData) -> dict[str, Any]:
    """The cache's mode, K, dtype, size and teacher, as the report's cache line reads them."""
    m = data.cache.manifest
    size = embedded_cache.disk_bytes(Path(data.cache.path))
    tokens = int(m["num_tokens"])
    return {"top_k": int(m["top_k"]), "mode": m["mode"], "samples": m["samples"],
            "dtype": m["dtype"], "sequences": int(m["num_sequences"]),
            "tokens": tokens, "bytes": size, "bytes_per_token": size / max(tokens, 1),
            "write_s": None, "dir": str(data.cache.path), "teacher": m.get("teacher")}


def cache_identity(path: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What --resume must find unchanged: the cache's path, data and shard hashes."""
    shards = hashlib.sha256("".join(s.get("sha256", "") for s in manifest["shards"])
                            .encode()).hexdigest()[:16]
    return {"path": str(Path(path).resolve()), "data_hash": manifest.get("data_hash"),
            "shards": shards, "top_k": manifest.get("top_k")}


def check_student(cache, student: torch.nn.Module, student_tok, student_name: str) -> None:
    """Refuse a cache that does not share the student's tokenizer, or whose ids (teacher or
    input) do not fit the student's head and embeddings; the messages name both sides."""
    from ...cache import tokenizer_hash
    from ...hf import models

    m = cache.manifest
    where = f"--teacher-cache {cache.path}"
    if student_tok is None:
        raise ValueError(f"{student_name} has no tokenizer to compare with {where} (teacher "
                         f"{m.get('teacher')!r}, tokenizer_hash {m.get('tokenizer_hash')}); save "
                         "the tokenizer with the student")
    ours = tokenizer_hash(student_tok)
    if m.get("tokenizer_hash") != ours:
        raise ValueError(f"{where} was written with another tokenizer than the student's: cache "
                         f"tokenizer_hash {m.get('tokenizer_hash')} (teacher "
                         f"{m.get('teacher')!r}) vs student {student_name} tokenizer_hash "
                         f"{ours}; distil from a cache of a teacher with the student's tokenizer")
    rows = int(models.head(student)[0].shape[0])
    vocab = m.get("vocab_size")
    if vocab is not None:
        if int(vocab) > rows:
            raise ValueError(f"{where} has vocab_size {vocab} (teacher {m.get('teacher')!r}) but "
                             f"the student {student_name} head has {rows} rows; the student "
                             f"needs at least {vocab}")
        return
    top = max_ids(cache)  # no vocab_size in the manifest: read the ids themselves
    if top >= rows:
        raise ValueError(f"{where} holds token id {top} (teacher {m.get('teacher')!r}) but the "
                         f"student {student_name} head has {rows} rows (ids 0..{rows - 1})")


def max_ids(cache) -> int:
    """The largest input or teacher id over every shard (one pass, shard by shard)."""
    from safetensors import safe_open

    top = -1
    for entry in cache.manifest["shards"]:
        with safe_open(str(Path(cache.path) / entry["file"]), framework="pt") as f:
            for name in ("input_ids", "teacher_ids"):
                t = f.get_tensor(name)
                if t.numel():
                    top = max(top, int(t.max()))
    return top
