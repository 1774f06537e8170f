"""Convert OpenAI-style `top_logprobs` JSONL into a kdkernels teacher cache.

Each JSONL line is one response: a chat/completions response object (``choices[0].logprobs``),
a choice, or the ``logprobs`` object itself, in either API form:

* chat completions: ``logprobs.content = [{"token", "logprob", "top_logprobs": [{"token",
  "logprob"}, ...]}, ...]``;
* completions (legacy): ``logprobs.tokens = [...]`` and ``logprobs.top_logprobs = [{token:
  logprob, ...}, ...]``.

Entry i of a response is the teacher's distribution of generated token i. The cache stores at
position t the distribution of the token after input_ids[t], so a response's tokens become
input_ids and position t gets entry t + 1; entry 0 (conditioned on the prompt, not in the
cache) is dropped and the last position is empty. Logprobs of -9999 (the API's "not among the
top 20") are dropped. Token strings are mapped to ids with --tokenizer: first as vocabulary
entries, then as decoded text; a string that matches neither is an error naming the line.

    python examples/cache_from_logprobs.py responses.jsonl --tokenizer TOKDIR --output CACHE
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kdkernels.cache import tokenizer_hash, write_cache

UNLIKELY = -9999.0  # the API's placeholder for a token outside the top 20


def _logprobs(obj: dict, where: str) -> dict:
    if "choices" in obj:
        obj = obj["choices"][0]
    if "logprobs" in obj and isinstance(obj["logprobs"], dict):
        obj = obj["logprobs"]
    if "content" in obj or "top_logprobs" in obj:
        return obj
    raise ValueError(f"{where}: no logprobs found (expected choices[0].logprobs.content or "
                     "logprobs.top_logprobs)")


def parse_response(obj: dict, where: str) -> tuple[list[str], list[list[tuple[str, float]]]]:
    """(generated tokens, per-position [(token, logprob)]) from either API form."""
    lp = _logprobs(obj, where)
    if lp.get("content") is not None:
        tokens = [c["token"] for c in lp["content"]]
        tops = [[(t["token"], float(t["logprob"])) for t in c.get("top_logprobs") or []]
                for c in lp["content"]]
    else:
        tokens = list(lp["tokens"])
        tops = [list((d or {}).items()) for d in lp["top_logprobs"]]
    if len(tokens) != len(tops):
        raise ValueError(f"{where}: {len(tokens)} tokens but {len(tops)} top_logprobs entries")
    return tokens, tops


class TokenMap:
    """Token strings to ids: vocabulary entries first, then the text each id decodes to."""

    def __init__(self, tokenizer) -> None:
        self.vocab = tokenizer.get_vocab()
        self.decoded: dict[str, int] = {}
        ambiguous = set()
        for token, i in self.vocab.items():
            text = tokenizer.convert_tokens_to_string([token])
            if text in self.decoded and self.decoded[text] != i:
                ambiguous.add(text)
            self.decoded.setdefault(text, i)
        for text in ambiguous:
            del self.decoded[text]

    def __call__(self, token: str, where: str) -> int:
        if token in self.vocab:
            return self.vocab[token]
        if token in self.decoded:
            return self.decoded[token]
        raise ValueError(f"{where}: token {token!r} is not known to the tokenizer (neither a "
                         "vocabulary entry nor the unambiguous text of one); use the "
                         "teacher's own tokenizer")


def convert(jsonl: Path, tokenizer, seq_len: int | None = None, top_k: int | None = None):
    """input_ids [n, L], teacher_ids [n, L, K], teacher_logprobs [n, L, K] from a JSONL file."""
    lookup = TokenMap(tokenizer)
    rows = []
    for no, line in enumerate(jsonl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{jsonl}:{no}"
        tokens, tops = parse_response(json.loads(line), where)
        ids = [lookup(t, f"{where} position {j}") for j, t in enumerate(tokens)]
        targets = []
        for j, top in enumerate(tops[1:] + [[]]):  # position t holds entry t + 1
            seen: dict[int, float] = {}
            for t, lp in top:
                if lp <= UNLIKELY:
                    continue
                i = lookup(t, f"{where} position {j + 1}")
                if i in seen:
                    raise ValueError(f"{where} position {j + 1}: two top_logprobs map to id {i}")
                seen[i] = lp
            targets.append(sorted(seen.items(), key=lambda kv: -kv[1]))
        rows.append((where, ids, targets))
    if not rows:
        raise ValueError(f"{jsonl}: no responses")
    L = seq_len or min(len(ids) for _, ids, _ in rows)
    K = top_k or max(1, max(len(t) for _, _, ts in rows for t in ts))
    short = [w for w, ids, _ in rows if len(ids) < L]
    if short:
        raise ValueError(f"{short[0]}: fewer than --seq-len {L} tokens")
    n = len(rows)
    input_ids = torch.zeros((n, L), dtype=torch.int32)
    teacher_ids = torch.full((n, L, K), -1, dtype=torch.int32)
    teacher_lp = torch.zeros((n, L, K), dtype=torch.float32)
    for s, (_, ids, targets) in enumerate(rows):
        input_ids[s] = torch.tensor(ids[:L])
        for t in range(L):
            for k, (i, lp) in enumerate(targets[t][:K]):
                teacher_ids[s, t, k], teacher_lp[s, t, k] = i, lp
    return input_ids, teacher_ids, teacher_lp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl", type=Path, help="OpenAI-style responses with top_logprobs")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory")
    p.add_argument("--output", required=True, help="cache directory")
    p.add_argument("--seq-len", type=int, help="tokens per sequence [shortest response]")
    p.add_argument("--top-k", type=int, help="slots per position [most top_logprobs seen]")
    p.add_argument("--teacher-name", help="recorded as the manifest's teacher [the file name]")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp32")
    p.add_argument("--shard-size", type=int, default=1024)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        arrays = convert(args.jsonl, tok, args.seq_len, args.top_k)
        meta = {"tokenizer_hash": tokenizer_hash(tok), "dtype": args.dtype, "mode": "topk",
                "teacher": args.teacher_name or f"openai-jsonl:{args.jsonl.name}",
                "vocab_size": len(tok), "data": str(args.jsonl)}
        m = write_cache(args.output, *arrays, meta=meta, shard_size=args.shard_size)
    except ValueError as err:
        print(f"cache_from_logprobs: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.output}: {m['num_sequences']} sequences x {m['seq_len']} tokens, "
          f"K = {m['top_k']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
