"""`kdk cache-teacher --teacher-url URL`: the cache of `kdk cache-teacher --teacher DIR`, its
targets scored by a teacher in an inference server (vLLM, SGLang or `kdk serve-teacher`).

The data is tokenised here with the local --tokenizer (the server's tokenizer is probed against
it by the client), cut into --seq-len sequences exactly as the in-process command cuts them, and
each batch is scored by the client (kdkernels.teachers), whose targets follow the cache's
position convention. Shards are written by the same CacheWriter, so a killed run resumes and a
server that fails after the client's retries stops the run with only complete shards listed.
The manifest's teacher is the URL and the served model id; its tokenizer_hash is the local
tokenizer's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache.hashing import tokenizer_hash, tokens_hash
from ..cache.writer import CacheWriter
from .cache_teacher import OPTION_NAMES, check_top_k
from .sources import cache_sources as sources

SERVERS = ("vllm", "sglang", "kdk")
# manifest keys of a served cache -> the option that changes them (named in a refusal)
SERVED_OPTION_NAMES = {**OPTION_NAMES, "teacher": "--teacher-url (and the served model id)",
                       "teacher_server": "--teacher-server",
                       "tokenizer_hash": "--tokenizer", "vocab_size": "--tokenizer (vocab)",
                       "generation": "--generate / --api-style", "pad_token_id": "--tokenizer",
                       "data_hash": "--data / --prompts (or --text-field)",
                       "expected_sequences": "--data / --prompts"}


@dataclass
class ServedCacheOptions:
    url: str
    output: str
    tokenizer: str | None = None  # a Hugging Face tokenizer directory, or "default"
    server: str = "kdk"
    api_key: str | None = None
    model: str | None = None  # the served model to ask for (default: the server's first)
    data: str | None = None
    text_field: str = "text"
    top_k: int = 64
    seq_len: int | None = None  # 512 when scoring; with --generate: longest prompt + N
    shard_size: int = 1024
    dtype: str = "bf16"
    batch_size: int = 8
    timeout: float = 60.0
    retries: int = 3
    progress: bool = True
    default_preset: str = "default"  # the preset whose tokenizer --tokenizer default loads
    prompts: str | None = None  # --generate: the prompts file
    generate: int | None = None  # --generate N: new tokens per prompt
    api_style: str = "completions"
    seed: int = 0

    def check(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--teacher-url must be an http:// or https:// URL (e.g. "
                             f"http://127.0.0.1:8000); got {self.url!r}")
        if self.tokenizer is None:
            raise ValueError("--tokenizer DIR|default is required with --teacher-url: the "
                             "data (or prompts) is tokenised here, and the cache's "
                             "tokenizer_hash is that tokenizer's")
        for name in ("top_k", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got "
                                 f"{getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2; got {self.seq_len}")
        if self.server not in SERVERS:
            raise ValueError(f"--teacher-server must be one of {', '.join(SERVERS)}; got "
                             f"{self.server!r}")
        if not self.timeout > 0:
            raise ValueError(f"--teacher-timeout must be > 0 seconds; got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"--teacher-retries must be >= 0; got {self.retries}")
        if self.generate is None:
            if self.prompts is not None:
                raise ValueError("--prompts needs --generate N (tokens to generate per prompt)")
            if self.data is None and self.tokenizer != sources.DEFAULT:
                raise ValueError("--data is required with --tokenizer DIR (only --tokenizer "
                                 "default has a corpus of its own)")
        else:
            if self.generate < 1:
                raise ValueError(f"--generate must be >= 1 new tokens; got {self.generate}")
            if self.prompts is None:
                raise ValueError("--generate N needs --prompts FILE (the prompts to continue)")
            if self.data is not None:
                raise ValueError("--generate caches generated sequences of --prompts; --data "
                                 "is for scoring given text: pass one of them")


def load_tokenizer(opts: ServedCacheOptions) -> tuple[Any, torch.Tensor | None]:
    """The local tokenizer and, for --tokenizer default, the embedded corpus's token ids (the
    data --teacher default caches without --data)."""
    if opts.tokenizer == sources.DEFAULT:
        from .config import preset
        from .runtime import distributed
        from .sources import training_data

        cfg = preset(opts.default_preset, device="cpu", progress=False)
        data = training_data.prepare(cfg, None, None, distributed.init("cpu"))
        return data.tok, data.train
    from transformers import AutoTokenizer

    if not Path(opts.tokenizer).is_dir():
        raise ValueError(f"--tokenizer {opts.tokenizer!r} is not a directory; pass a local "
                         f"Hugging Face tokenizer (or model) directory or '{sources.DEFAULT}'")
    try:
        return AutoTokenizer.from_pretrained(opts.tokenizer), None
    except (OSError, ValueError) as err:
        raise ValueError(f"--tokenizer {opts.tokenizer}: not a loadable tokenizer "
                         f"({err})") from None


def teacher_name(url: str, model_id: str) -> str:
    """The manifest's teacher: where it was served and what the server called it."""
    return f"{url.rstrip('/')} ({model_id})"


def cache_from_server(opts: ServedCacheOptions) -> dict:
    """Write (or resume, or confirm) the cache from a served teacher; returns the manifest."""
    from ..teachers import make_teacher
    from ..teachers.errors import TeacherError

    opts.check()
    t0 = time.perf_counter()
    tok, corpus_ids = load_tokenizer(opts)
    ids = (corpus_ids if opts.data is None
           else sources.encode_texts(tok, sources.read_data(opts.data, opts.text_field)))
    L = 512 if opts.seq_len is None else opts.seq_len
    n = ids.numel() // L
    if n == 0:
        raise ValueError(f"--data tokenises to {ids.numel()} tokens, fewer than one sequence "
                         f"of --seq-len {L}")
    seqs = ids[:n * L].view(n, L)
    writer = None
    try:
        client = make_teacher(opts.server, opts.url, top_k=opts.top_k, timeout=opts.timeout,
                              retries=opts.retries, model=opts.model, api_key=opts.api_key,
                              tokenizer=tok)
        try:
            name = teacher_name(opts.url, client.model_id)
            vocab = int(getattr(client, "vocab_size", None) or len(tok))
            check_top_k(opts, vocab, name)  # the in-process refusal, before any write
            settings = {"teacher": name, "teacher_server": opts.server,
                        "teacher_config_hash": None, "tokenizer_hash": tokenizer_hash(tok),
                        "vocab_size": vocab, "top_k": opts.top_k, "mode": "topk",
                        "samples": None, "seed": None, "seq_len": L, "dtype": opts.dtype,
                        "shard_size": opts.shard_size,
                        "data": None if opts.data is None else str(Path(opts.data).resolve()),
                        "data_hash": tokens_hash(seqs), "expected_sequences": n}
            writer = CacheWriter(opts.output, settings, option_names=SERVED_OPTION_NAMES)
            if writer.complete:
                print(f"kdk cache-teacher: {opts.output} is already complete ({n} sequences, "
                      f"{n * L} tokens); nothing to do")
            else:
                if writer.done_sequences:
                    print(f"kdk cache-teacher: resuming {opts.output} after "
                          f"{writer.done_sequences} of {n} sequences "
                          f"({len(writer.manifest['shards'])} complete shards)")
                _write_shards(opts, writer, client, seqs)
                writer.finish()
            _summary(writer, client, t0)
            return writer.manifest
        finally:
            client.close()
    except TeacherError as err:
        raise ValueError(stopped(opts, writer, err)) from err


def stopped(opts: ServedCacheOptions, writer: CacheWriter | None, err: BaseException) -> str:
    """The error of a run whose server failed: what the client said, what is kept, what next."""
    if writer is None:
        return f"--teacher-url {opts.url}: {err}"
    m = writer.manifest
    return (f"the teacher at {opts.url} failed: {err}; {opts.output} keeps its "
            f"{len(m['shards'])} complete shards ({m['num_sequences']} sequences); restart "
            "the server and rerun the same command to resume")


def _write_shards(opts: ServedCacheOptions, writer: CacheWriter, client,
                  seqs: torch.Tensor) -> None:
    from tqdm.auto import tqdm

    n, L = seqs.shape
    bar = tqdm(total=n * L, initial=writer.done_sequences * L, unit="tok", unit_scale=True,
               desc="teacher cache (served)", disable=not opts.progress, dynamic_ncols=True)
    with bar:
        for start in range(writer.done_sequences, n, opts.shard_size):
            stop = min(start + opts.shard_size, n)
            ids, lps = [], []
            # --batch-size sequences per call; the client splits a call into requests of its
            # token budget and sends them concurrently
            for b in range(start, stop, opts.batch_size):
                e = min(b + opts.batch_size, stop)
                i, lp = client.score(seqs[b:e])
                ids.append(i)
                lps.append(lp)
                bar.update((e - b) * L)
            writer.add_shard(seqs[start:stop], torch.cat(ids), torch.cat(lps))


def _summary(writer: CacheWriter, client, t0: float) -> None:
    m = writer.manifest
    size = writer.shard_bytes()
    per = size / max(m["num_tokens"], 1)
    s = getattr(client, "stats", None)
    wire = (f"; {s.requests} requests ({s.retries} retries), {s.bytes_received} bytes "
            f"received in {s.seconds:.1f} s" if s is not None else "")
    print(f"kdk cache-teacher: {m['num_sequences']} sequences, {m['num_tokens']} tokens in "
          f"{len(m['shards'])} shards, {size} bytes: {per:.1f} bytes per token "
          f"(K = {m['top_k']}, {m['dtype']}, teacher {m['teacher']}){wire}; elapsed "
          f"{time.perf_counter() - t0:.1f} s")
