"""`kdk cache-teacher --teacher-url URL --prompts FILE --generate N`: sequence-level KD with soft
targets, the only distillation a closed API allows.

Each prompt is sent to an OpenAI-compatible `/v1/completions` or `/v1/chat/completions`
endpoint, which samples up to N tokens at T = 1 and returns the top-K log-probs of each. The
prompt and its generation become one cache row whose generated positions hold those top-K
(layout: sources/generated_sequences.py and docs/teacher_cache.md); the student then trains on
it with the top-k loss (`kdk distill --teacher-cache`), the prompt and padding positions
carrying no loss. Ids come from the endpoint when it returns them (vLLM's return_token_ids,
`kdk serve-teacher`); otherwise the generated text is re-tokenised locally and refused unless
it splits into the endpoint's own tokens.

Prompts go out in shards of --shard-size, --batch-size at a time; each shard is written when
all its prompts are answered, so a killed run resumes after its last complete shard. Each
prompt's request carries the seed --seed + its index, so a server that honours seeds
regenerates the same text on a rerun.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..cache.hashing import tokenizer_hash
from ..cache.writer import CacheWriter
from .cache_from_server import (
    SERVED_OPTION_NAMES,
    ServedCacheOptions,
    load_tokenizer,
    teacher_name,
)
from .sources.generated_sequences import RowStats, row
from .sources.openai_generation import API_STYLES, Endpoint, base_url
from .sources.token_pieces import TokenPieces

LAYOUT = "generated"  # the manifest's "layout": positions without a target carry no loss


def read_prompts(path: str) -> list[tuple[str, str]]:
    """(prompt, where) pairs: a .jsonl/.json file of strings or {"prompt": ...} objects (one a
    line), else a text file of one prompt per non-empty line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {path!r} is not a file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({err})") from None
    records = p.suffix.lower() in (".jsonl", ".json")
    out = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p.name}:{no}"
        if not records:
            out.append((line, where))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--prompts {where}: not JSON ({err})") from None
        text = rec.get("prompt") if isinstance(rec, dict) else rec
        if not isinstance(text, str) or not text:
            raise ValueError(f"--prompts {where}: expected a string or an object with a "
                             f"non-empty string 'prompt'; got {line[:80]!r}")
        out.append((text, where))
    if not out:
        raise ValueError(f"--prompts {path} holds no prompts")
    return out


def prompt_ids(tok, text: str, api_style: str) -> list[int]:
    """The prompt as the student reads it: completions, the tokenizer's own encoding (BOS
    included when it adds one; the same ids are sent to the endpoint); chat, the tokenizer's
    chat template with the generation prompt, if it has one, else the plain encoding."""
    if api_style == "chat" and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                      add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tok(text, verbose=False)["input_ids"]]


def _pad_id(tok) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            return int(v)
    return 0


def served_model(url: str, api_key: str | None, timeout: float) -> str:
    """The id of the one model /v1/models lists (refused when it lists several: name one)."""
    import urllib.request

    req = urllib.request.Request(base_url(url) + "/v1/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            ids = [m["id"] for m in json.loads(r.read())["data"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--teacher-url {url}: could not read the served model from "
                         f"{base_url(url)}/v1/models ({err}); pass --teacher-model NAME") from None
    if len(ids) != 1:
        raise ValueError(f"--teacher-url {url} serves {len(ids)} models ({', '.join(ids[:5])}"
                         f"{'...' if len(ids) > 5 else ''}); pass --teacher-model NAME")
    return str(ids[0])


def cache_generated(opts: ServedCacheOptions) -> dict:
    """Generate, convert and write (or resume, or confirm) the cache; returns its manifest."""
    opts.check()
    if opts.api_style not in API_STYLES:
        raise ValueError(f"--api-style must be one of {', '.join(API_STYLES)}; got "
                         f"{opts.api_style!r}")
    t0 = time.perf_counter()
    tok, _ = load_tokenizer(opts)
    prompts = read_prompts(opts.prompts)
    local = [prompt_ids(tok, text, opts.api_style) for text, _ in prompts]
    N = opts.generate
    L = opts.seq_len if opts.seq_len is not None else max(len(p) for p in local) + N
    model = opts.model or served_model(opts.url, opts.api_key, opts.timeout)
    endpoint = Endpoint(opts.url, model, opts.api_style, opts.api_key, timeout=opts.timeout,
                        retries=opts.retries)
    vocab = len(tok)
    if opts.top_k > vocab:
        raise ValueError(f"--top-k {opts.top_k} is larger than the tokenizer's vocabulary "
                         f"({vocab} tokens); pass --top-k {vocab} or less")
    pad = _pad_id(tok)
    digest = hashlib.sha256(json.dumps([t for t, _ in prompts]).encode()).hexdigest()
    settings = {"teacher": teacher_name(opts.url, model), "teacher_config_hash": None,
                "tokenizer_hash": tokenizer_hash(tok),
                "vocab_size": vocab, "top_k": opts.top_k, "mode": "topk", "samples": None,
                "seed": opts.seed, "seq_len": L, "dtype": opts.dtype,
                "shard_size": opts.shard_size, "data": str(Path(opts.prompts).resolve()),
                "data_hash": digest, "expected_sequences": len(prompts), "layout": LAYOUT,
                "generation": {"api_style": opts.api_style, "max_new_tokens": N,
                               "temperature": 1.0},
                "pad_token_id": pad}
    writer = CacheWriter(opts.output, settings, option_names=SERVED_OPTION_NAMES)
    n = len(prompts)
    total = RowStats()
    if writer.complete:
        print(f"kdk cache-teacher: {opts.output} is already complete ({n} generated "
              "sequences); nothing to do")
    else:
        if writer.done_sequences:
            print(f"kdk cache-teacher: resuming {opts.output} after {writer.done_sequences} "
                  f"of {n} prompts ({len(writer.manifest['shards'])} complete shards)")
        pieces = TokenPieces(tok)
        job = _Job(opts, endpoint, pieces, prompts, local, L, vocab, pad)
        try:
            _write_shards(opts, writer, job, total)
        except RuntimeError as err:  # the endpoint failed through its retries
            m = writer.manifest
            raise ValueError(f"{err}; {opts.output} keeps its {len(m['shards'])} complete "
                             f"shards ({m['num_sequences']} sequences); rerun the same command "
                             "to resume") from err
        writer.finish()
    _summary(writer, endpoint, total, t0)
    return writer.manifest


class _Job:
    """What one prompt's request and row need (shared by the worker threads, read only)."""

    def __init__(self, opts, endpoint, pieces, prompts, local, seq_len, vocab, pad) -> None:
        self.opts, self.endpoint, self.pieces = opts, endpoint, pieces
        self.prompts, self.local = prompts, local
        self.seq_len, self.vocab, self.pad = seq_len, vocab, pad

    def __call__(self, index: int):
        text, line = self.prompts[index]
        where = f"prompt {index} (--prompts {line})"
        sent = self.local[index] if self.opts.api_style == "completions" else text
        gen = self.endpoint.generate(sent, self.opts.generate, self.opts.top_k,
                                     self.opts.seed + index, where)
        ids = self.local[index]
        if gen.prompt_ids is not None:
            if self.opts.api_style == "completions" and gen.prompt_ids != ids:
                raise ValueError(f"{where}: the endpoint's prompt_token_ids differ from the "
                                 f"ids sent ({len(gen.prompt_ids)} vs {len(ids)} tokens)")
            ids = gen.prompt_ids  # chat: the server's own rendering of the template
        return row(ids, gen, self.pieces, seq_len=self.seq_len, k=self.opts.top_k,
                   vocab_size=self.vocab, pad_id=self.pad, where=where)


def _write_shards(opts: ServedCacheOptions, writer: CacheWriter, job: _Job,
                  total: RowStats) -> None:
    from tqdm.auto import tqdm

    n = len(job.prompts)
    bar = tqdm(total=n, initial=writer.done_sequences, unit="prompt", desc="generations",
               disable=not opts.progress, dynamic_ncols=True)
    with bar, ThreadPoolExecutor(max_workers=opts.batch_size) as pool:
        for start in range(writer.done_sequences, n, opts.shard_size):
            stop = min(start + opts.shard_size, n)
            rows = []
            for r in pool.map(job, range(start, stop)):  # in prompt order
                rows.append(r)
                total.add(r[3])
                bar.update(1)
            writer.add_shard(torch.stack([r[0] for r in rows]),
                             torch.stack([r[1] for r in rows]),
                             torch.stack([r[2] for r in rows]), checked=True)


def _summary(writer: CacheWriter, endpoint: Endpoint, total: RowStats, t0: float) -> None:
    m = writer.manifest
    for note in dict.fromkeys(endpoint.notes):
        print(f"kdk cache-teacher: {note}", file=sys.stderr)
    if total.empty_slots:
        print(f"kdk cache-teacher: {total.empty_slots} of {total.entries} top_logprobs entries "
              "are not single tokens of the local tokenizer: their slots are left empty",
              file=sys.stderr)
    if total.no_targets:
        print(f"kdk cache-teacher: {total.no_targets} generations are empty: their rows have no "
              "target (a training batch of only such rows has nothing to learn)",
              file=sys.stderr)
    if total.cut:
        print(f"kdk cache-teacher: {total.cut} generated tokens beyond --seq-len "
              f"{m['seq_len']} were dropped", file=sys.stderr)
    print(f"kdk cache-teacher: {m['num_sequences']} generated sequences (seq_len "
          f"{m['seq_len']}, K = {m['top_k']}, {m['dtype']}) in {len(m['shards'])} shards; this "
          f"run: {total.generated} generated tokens, {total.stopped} generations stopped "
          f"before --generate, {endpoint.requests} requests ({endpoint.retried} retries); "
          f"teacher {m['teacher']}; elapsed {time.perf_counter() - t0:.1f} s")
