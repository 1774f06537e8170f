"""`kdk cache-teacher`: run a teacher over text and write its sparse targets as a cache."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import format as fmt
from ..cache import scoring as teacher
from ..cache.hashing import config_hash, tokenizer_hash, tokens_hash
from ..cache.writer import CacheWriter
from ..hf import models
from .sources import cache_sources as sources

# manifest key -> the option a user changes to change it (named in a refusal)
OPTION_NAMES = {"teacher": "--teacher", "teacher_config_hash": "--teacher (its config)",
                "tokenizer_hash": "--teacher (its tokenizer)", "vocab_size": "--teacher (vocab)",
                "top_k": "--top-k", "mode": "--mode", "samples": "--samples", "seed": "--seed",
                "seq_len": "--seq-len", "dtype": "--dtype", "shard_size": "--shard-size",
                "data_hash": "--data (or --text-field)", "expected_sequences": "--data",
                "format_version": "format_version (written by another kdkernels)"}


@dataclass
class CacheOptions:
    teacher: str
    output: str
    data: str | None = None
    text_field: str = "text"  # the records' text field (JSONL, parquet, datasets --data)
    top_k: int = 64
    mode: str = "topk"
    samples: int = 64
    seq_len: int = 512
    shard_size: int = 1024
    dtype: str = "bf16"
    batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    default_preset: str = "default"  # the `kdk distill` preset behind --teacher default

    def check(self) -> None:
        for name in ("top_k", "samples", "seq_len", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got "
                                 f"{getattr(self, name)}")
        if self.mode not in ("topk", "sample"):
            raise ValueError(f"--mode must be topk or sample; got {self.mode!r}")
        if self.data is None and self.teacher != sources.DEFAULT:
            raise ValueError("--data is required with a --teacher directory (only --teacher "
                             "default has a corpus of its own)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device} but torch sees no CUDA device")


def _teacher(opts: CacheOptions, device: torch.device):
    """The teacher, its tokenizer, the embedded corpus (--teacher default) and its name."""
    if opts.teacher == sources.DEFAULT:
        model, tok, corpus_ids = sources.default_teacher(device, opts.default_preset)
        return model, tok, corpus_ids, sources.DEFAULT
    model, tok = sources.load_teacher(opts.teacher, device)
    return model, tok, None, str(Path(opts.teacher).resolve())


def check_top_k(opts: CacheOptions, vocab_size: int, name: str) -> None:
    """K slots of distinct ids cannot exceed the vocabulary (the loss refuses such a cache):
    refused before any sequence is scored or any file written."""
    if opts.top_k > vocab_size:
        raise ValueError(f"--top-k {opts.top_k} is larger than the teacher's vocabulary "
                         f"({vocab_size} tokens, teacher {name}); pass --top-k {vocab_size} "
                         "or less")


def _sampling_settings(opts: CacheOptions) -> dict:
    """--samples and --seed as the manifest records them. Top-k targets depend on neither, so
    a top-k cache records None and a rerun with other values resumes it (refusing them would
    refuse a cache identical to the one asked for); an existing cache keeps what it holds
    (top-k caches written before this recorded --seed; a sample cache is refused by --mode)."""
    if opts.mode == "sample":
        return {"samples": opts.samples, "seed": opts.seed}
    try:
        old = fmt.read_manifest(Path(opts.output))
    except ValueError:  # none yet, or unreadable: CacheWriter names the problem
        return {"samples": None, "seed": None}
    return {"samples": old.get("samples"), "seed": old.get("seed")}


def cache_teacher(opts: CacheOptions) -> dict:
    """Write (or resume, or confirm) the cache; returns its manifest."""
    opts.check()
    t0 = time.perf_counter()
    device = torch.device(opts.device)
    model, tok, corpus_ids, name = _teacher(opts, device)
    head = teacher.Head.of(model)
    check_top_k(opts, head.vocab_size, name)
    ids = (corpus_ids if opts.data is None
           else sources.encode_texts(tok, sources.read_data(opts.data, opts.text_field)))
    L = opts.seq_len
    n = ids.numel() // L
    if n == 0:
        raise ValueError(f"--data tokenises to {ids.numel()} tokens, fewer than one sequence "
                         f"of --seq-len {L}")
    models.check_seq_len(model, L, "teacher")
    seqs = ids[:n * L].view(n, L)
    if opts.mode == "sample" and opts.top_k < opts.samples:
        print(f"kdk cache-teacher: --top-k {opts.top_k} < --samples {opts.samples}: positions "
              f"with more than {opts.top_k} distinct sampled ids keep the {opts.top_k} most "
              "frequent (their log-probs then sum to less than 1)", file=sys.stderr)
    settings = {"teacher": name, "teacher_config_hash": config_hash(model.config),
                "tokenizer_hash": tokenizer_hash(tok), "vocab_size": head.vocab_size,
                "top_k": opts.top_k, "mode": opts.mode, **_sampling_settings(opts),
                "seq_len": L, "dtype": opts.dtype, "shard_size": opts.shard_size,
                "data": None if opts.data is None else str(Path(opts.data).resolve()),
                "data_hash": tokens_hash(seqs), "expected_sequences": n}
    writer = CacheWriter(opts.output, settings, option_names=OPTION_NAMES)
    if writer.complete:
        print(f"kdk cache-teacher: {opts.output} is already complete ({n} sequences, "
              f"{n * L} tokens); nothing to do")
        _summary(writer, t0)
        return writer.manifest
    done = writer.done_sequences
    if done:
        print(f"kdk cache-teacher: resuming {opts.output} after {done} of {n} sequences "
              f"({len(writer.manifest['shards'])} complete shards)")
    _write_shards(opts, writer, model, head, seqs, device)
    writer.finish()
    _summary(writer, t0)
    return writer.manifest


def _write_shards(opts: CacheOptions, writer: CacheWriter, model, head: teacher.Head,
                  seqs: torch.Tensor, device: torch.device) -> None:
    from tqdm.auto import tqdm

    n, L = seqs.shape
    bar = tqdm(total=n * L, initial=writer.done_sequences * L, unit="tok", unit_scale=True,
               desc="teacher cache", disable=not opts.progress, dynamic_ncols=True)
    with bar:
        for start in range(writer.done_sequences, n, opts.shard_size):
            stop = min(start + opts.shard_size, n)
            ids, lps = [], []
            for b in range(start, stop, opts.batch_size):  # batches never cross a shard
                e = min(b + opts.batch_size, stop)
                i, lp = teacher.score(model, head, seqs[b:e], mode=opts.mode, k=opts.top_k,
                                      samples=opts.samples, seed=opts.seed, first_index=b,
                                      device=device)
                ids.append(i)
                lps.append(lp)
                bar.update((e - b) * L)
            writer.add_shard(seqs[start:stop], torch.cat(ids), torch.cat(lps))


def _summary(writer: CacheWriter, t0: float) -> None:
    m = writer.manifest
    size = writer.shard_bytes()
    per = size / max(m["num_tokens"], 1)
    print(f"kdk cache-teacher: {m['num_sequences']} sequences, {m['num_tokens']} tokens in "
          f"{len(m['shards'])} shards, {size} bytes: {per:.1f} bytes per token "
          f"(K = {m['top_k']}, {m['dtype']}); elapsed {time.perf_counter() - t0:.1f} s")
