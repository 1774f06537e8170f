"""A teacher served by vLLM (or any server speaking its /v1/completions subset, such as
``kdk serve-teacher``).

The request (TRL's ``VLLMClient.get_sequence_logprobs`` shape): ``prompt`` = the list of id
lists, ``max_tokens: 1``, ``temperature: 1.0``, ``prompt_logprobs: K``, ``logprobs: K``,
``return_tokens_as_token_ids: true``. The answer, one choice per prompt:

- ``prompt_logprobs[i]`` is log p(token i | tokens < i): entry 0 is null, each other entry an
  object keyed by token id strings, ``{"<id>": {"logprob", "rank", "decoded_token"}}``, holding
  the top K (ranks 1..K) plus the prompt's actual token with its true rank when that is
  outside the top K. Entry t + 1 fills position t (the cache's convention: position t holds
  the distribution of the token after t). Entries are ordered by ``rank`` and the first K kept,
  which drops the actual-token extra (the object's own order puts the actual token first).
- ``logprobs.top_logprobs[0]`` is the generated token's top K, keyed ``"token_id:<id>"`` (with
  ``return_tokens_as_token_ids``; the sampled token may be added as a K+1-th entry): ordered by
  log-prob, the first K fill position L - 1. Without it, position L - 1 stays empty.
- A log-prob of -9999 is vLLM's clamp of -inf: an empty slot.

vLLM applies no temperature to prompt log-probs, hence T = 1 here (the loss applies T).
K above the server's ``--max-logprobs`` (default 20) is refused with a 400, raised here as a
``ValueError`` naming ``--max-logprobs``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import TeacherClient
from .errors import TeacherResponseError
from .slots import empty_targets, fill, logprob, token_id
from .validate import FieldOf, check_targets

TOKEN_ID_PREFIX = "token_id:"


def completion_request(rows: np.ndarray, k: int, model: str | None) -> dict[str, Any]:
    """The /v1/completions body that scores ``rows`` [b, L] with top-``k`` log-probs."""
    body: dict[str, Any] = {
        "prompt": rows.tolist(), "max_tokens": 1, "temperature": 1.0, "n": 1,
        "prompt_logprobs": k, "logprobs": k, "return_tokens_as_token_ids": True,
    }
    if model is not None:
        body["model"] = model
    return body


def _prompt_entry(entry: Any, where: str) -> list[tuple[int, float | None]]:
    """One ``prompt_logprobs`` entry as (id, log-prob) in rank order (ties by log-prob)."""
    if not isinstance(entry, dict):
        raise TeacherResponseError(f"{where}: expected an object keyed by token id, got "
                                   f"{str(entry)[:100]}")
    keyed = []
    for key, value in entry.items():
        try:
            tok = int(key)
        except ValueError:
            raise TeacherResponseError(
                f"{where}: key {key!r} is not a token id (an old vLLM keys prompt log-probs "
                f"by decoded strings, which collide; use a vLLM that keys them by id)") from None
        tok = token_id(tok, where)
        if isinstance(value, dict):
            lp = logprob(value.get("logprob"), f"{where}[{key!r}].logprob")
            rank = value.get("rank")
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
                raise TeacherResponseError(f"{where}[{key!r}].rank: {rank!r} is not an integer")
        else:  # {"<id>": logprob}: no rank, order by log-prob
            lp, rank = logprob(value, f"{where}[{key!r}]"), None
        keyed.append((math.inf if rank is None else rank,
                      math.inf if lp is None else -lp, tok, lp))
    keyed.sort(key=lambda e: (e[0], e[1], e[2]))
    return [(tok, lp) for _, _, tok, lp in keyed]


def _generated_entry(entry: Any, where: str) -> list[tuple[int, float | None]]:
    """The generated token's ``top_logprobs`` object as (id, log-prob), most likely first."""
    if not isinstance(entry, dict):
        raise TeacherResponseError(f"{where}: expected an object keyed \"token_id:<id>\", got "
                                   f"{str(entry)[:100]}")
    pairs = []
    for key, value in entry.items():
        if not (isinstance(key, str) and key.startswith(TOKEN_ID_PREFIX)):
            raise TeacherResponseError(
                f"{where}: key {key!r} is a decoded string, not \"token_id:<id>\" (send "
                f"return_tokens_as_token_ids: true; decoded strings collide)")
        try:
            tok = int(key[len(TOKEN_ID_PREFIX):])
        except ValueError:
            raise TeacherResponseError(f"{where}: key {key!r} has no integer id") from None
        pairs.append((token_id(tok, where), logprob(value, f"{where}[{key!r}]")))
    pairs.sort(key=lambda p: (math.inf if p[1] is None else -p[1], p[0]))
    return pairs


def parse_completions(body: Any, rows: np.ndarray, k: int, *, url: str = "",
                      row_offset: int = 0) -> tuple[np.ndarray, np.ndarray, FieldOf]:
    """(ids int32 [b, L, K], logprobs float32 [b, L, K], field namer) of a /v1/completions
    answer to ``rows`` [b, L]; unvalidated (``check_targets`` does that)."""
    b, L = rows.shape
    head = f"the teacher at {url}" if url else "the teacher"
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != b or \
            not all(isinstance(c, dict) for c in choices):
        n = len(choices) if isinstance(choices, list) else "no"
        raise TeacherResponseError(f"{head}: the answer to rows {row_offset}..{row_offset + b - 1}"
                                   f" has {n} choices, expected {b} (field choices)")
    if all(isinstance(c.get("index"), int) for c in choices):
        choices = sorted(choices, key=lambda c: c["index"])
        if [c["index"] for c in choices] != list(range(b)):
            raise TeacherResponseError(f"{head}: choices[].index is "
                                       f"{[c['index'] for c in choices]}, expected 0..{b - 1}")
    ids, lps = empty_targets(b, L, k)

    def field(r: int, t: int) -> str:
        return (f"choices[{r}].prompt_logprobs[{t + 1}]" if t < L - 1
                else f"choices[{r}].logprobs.top_logprobs[0]")

    for r, choice in enumerate(choices):
        where = f"{head}, row {row_offset + r}: choices[{r}]"
        sent = choice.get("prompt_token_ids")
        if sent is not None and sent != rows[r].tolist():
            raise TeacherResponseError(f"{where}.prompt_token_ids differs from the prompt sent "
                                       f"(the answers are out of order or re-tokenized)")
        plp = choice.get("prompt_logprobs")
        if not isinstance(plp, list) or len(plp) != L:
            n = len(plp) if isinstance(plp, list) else plp
            raise TeacherResponseError(f"{where}.prompt_logprobs has {str(n)[:50]} entries, "
                                       f"expected one per prompt token ({L}); send "
                                       f"prompt_logprobs: K")
        for t in range(L - 1):
            entry = plp[t + 1]
            if entry is not None:
                fill(ids[r, t], lps[r, t], _prompt_entry(entry, f"{where}.prompt_logprobs"
                                                                f"[{t + 1}]"), k)
        gen = choice.get("logprobs")
        if gen is None:
            continue
        top = gen.get("top_logprobs") if isinstance(gen, dict) else None
        if not isinstance(top, list):
            raise TeacherResponseError(f"{where}.logprobs.top_logprobs: expected a list, got "
                                       f"{str(top)[:100]}")
        if top and top[0] is not None:
            fill(ids[r, L - 1], lps[r, L - 1],
                 _generated_entry(top[0], f"{where}.logprobs.top_logprobs[0]"), k)
    return ids, lps, field


class VLLMTeacher(TeacherClient):
    """Top-K targets from vLLM's /v1/completions with ``prompt_logprobs``."""

    server = "vllm"
    probe_routes = ("tokenize", "completions")

    def _score_rows(self, rows: np.ndarray, row_offset: int) -> tuple[np.ndarray, np.ndarray]:
        body = self.post_json("/v1/completions",
                              completion_request(rows, self.top_k, self.model_id))
        url = self._transport.url_of("/v1/completions")
        ids, lps, field = parse_completions(body, rows, self.top_k, url=url,
                                            row_offset=row_offset)
        check_targets(ids, lps, url=url, rows=rows.shape[0], length=rows.shape[1],
                      k=self.top_k, vocab_size=self.vocab_size, row_offset=row_offset,
                      field=field)
        return ids, lps
