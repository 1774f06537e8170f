"""Request parsing and validation (a 400 naming the field, in vLLM's error shape) and response
building for the routes of `kdk serve-teacher`. No model work here: just JSON."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .scoring import RowLogprobs, Sampling

VLLM_CLAMP = -9999.0  # vLLM's JSON value for a log-prob of -inf
DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
HIDDEN_DTYPES = ("float32", "bfloat16", "float16")


class RequestError(Exception):
    """A refused request: its HTTP status and vLLM's error JSON."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


@dataclass(frozen=True)
class Limits:
    model_id: str
    vocab_size: int
    max_model_len: int
    max_logprobs: int
    max_request_tokens: int
    max_new_tokens: int


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON ({err})", "body") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object; got "
                           f"{type(body).__name__}", "body")
    return body


def dumps(body: Any) -> bytes:
    """Compact JSON; non-finite floats were clamped before, so this never writes NaN/Infinity."""
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


# ---- scalar fields -------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(body: dict, name: str, default: int | None, lo: int | None = None,
            hi: int | None = None, hi_flag: str | None = None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return None
    if not _is_int(v):
        raise RequestError(f"{name} must be an integer; got {v!r}", name)
    if lo is not None and v < lo:
        raise RequestError(f"{name} must be >= {lo}; got {v}", name)
    if hi is not None and v > hi:
        why = f" (the server's {hi_flag})" if hi_flag else ""
        raise RequestError(f"{name} {v} is above the limit {hi}{why}", name)
    return v


def number(body: dict, name: str, default: float, lo: float, hi: float = math.inf,
           lo_open: bool = False) -> float:
    v = body.get(name, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(f"{name} must be a finite number; got {v!r}", name)
    if v < lo or (lo_open and v == lo) or v > hi:
        low = f"> {lo}" if lo_open else f">= {lo}"
        high = "" if hi == math.inf else f" and <= {hi}"
        raise RequestError(f"{name} must be {low}{high}; got {v}", name)
    return float(v)


def flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be true or false; got {v!r}", name)
    return v


def logprob_count(body: dict, name: str, limits: Limits) -> int | None:
    """A number of log-probs per position (null: none). -1 means the whole vocabulary (as in
    vLLM); either way it is capped by --max-logprobs."""
    k = integer(body, name, None, lo=-1)
    if k is None:
        return None
    want = limits.vocab_size if k == -1 else k
    if want > limits.max_logprobs:
        raise RequestError(f"{name} {k} asks for {want} log-probs per position, more than the "
                           f"server's --max-logprobs {limits.max_logprobs}; ask for at most "
                           f"{limits.max_logprobs} or restart the server with a larger "
                           "--max-logprobs", name)
    return want


def check_model(body: dict, limits: Limits) -> None:
    model = body.get("model")
    if model is not None and model != limits.model_id:
        # vLLM's answer to an unknown model: 404 NotFoundError
        raise RequestError(f"The model `{model}` does not exist: this server serves "
                           f"{limits.model_id!r} (omit model or send that id)", "model",
                           status=404, kind="NotFoundError")


# ---- token rows ----------------------------------------------------------------------------
def token_rows(value: Any, name: str, limits: Limits,
               tokenize: Callable[[str], list[int]] | None = None,
               flat_is_one_row: bool = True) -> list[list[int]]:
    """A list of id lists (or one id list; or text when ``tokenize`` is given), each id in
    the vocabulary, each row non-empty and within max_model_len, the whole within
    --max-request-tokens."""
    if tokenize is not None and isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        what = "a non-empty list of token ids or of id lists"
        if tokenize is not None:
            what += ", a string or a list of strings"
        raise RequestError(f"{name} must be {what}; got {_short(value)}", name)
    if tokenize is not None and all(isinstance(v, str) for v in value):
        rows = [tokenize(v) for v in value]
    elif all(_is_int(v) for v in value) and flat_is_one_row:
        rows = [value]
    elif all(isinstance(v, list) for v in value):
        rows = value
    else:
        raise RequestError(f"{name} must be a list of token ids or a list of id lists (not "
                           f"a mix); got {_short(value)}", name)
    total = 0
    for i, row in enumerate(rows):
        where = f"{name}[{i}]" if len(rows) > 1 or not flat_is_one_row else name
        if not row:
            raise RequestError(f"{where} is empty: every row needs at least one token", name)
        if len(row) > limits.max_model_len:
            raise RequestError(f"{where} has {len(row)} tokens, more than the model's "
                               f"max_model_len {limits.max_model_len}", name)
        for j, t in enumerate(row):
            if not _is_int(t) or not 0 <= t < limits.vocab_size:
                raise RequestError(f"{where}[{j}] = {t!r} is not a token id of the served model "
                                   f"(integers 0..{limits.vocab_size - 1})", name)
        total += len(row)
    if total > limits.max_request_tokens:
        raise RequestError(f"{name} holds {total} tokens, more than the server's "
                           f"--max-request-tokens {limits.max_request_tokens}; split the "
                           "request", name)
    return rows


def rectangular(rows: list[list[int]], name: str) -> None:
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise RequestError(f"{name}[{i}] has {len(row)} tokens where {name}[0] has "
                               f"{len(rows[0])}: the rows of one request must be equally long "
                               "(send rows of other lengths in other requests)", name)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- /v1/topk and /v1/hidden ---------------------------------------------------------------
@dataclass(frozen=True)
class TopKRequest:
    rows: list[list[int]]
    top_k: int
    temperature: float


def _id_rows(body: dict, limits: Limits) -> list[list[int]]:
    """The checked ``model`` and ``input_ids`` (equally long id lists) of a binary route."""
    check_model(body, limits)
    if "input_ids" not in body:
        raise RequestError("input_ids is required: a list of equally long token-id lists",
                           "input_ids")
    rows = token_rows(body["input_ids"], "input_ids", limits, flat_is_one_row=False)
    rectangular(rows, "input_ids")
    return rows


def parse_topk(body: dict, limits: Limits) -> TopKRequest:
    rows = _id_rows(body, limits)
    if body.get("top_k") is None:
        raise RequestError("top_k is required: the number of (id, log-prob) slots per "
                           "position", "top_k")
    k = integer(body, "top_k", None, lo=1)
    if k > limits.max_logprobs:
        raise RequestError(f"top_k {k} is more than the server's --max-logprobs "
                           f"{limits.max_logprobs}; ask for at most {limits.max_logprobs} or "
                           "restart the server with a larger --max-logprobs", "top_k")
    t = number(body, "temperature", 1.0, 0.0, lo_open=True)
    return TopKRequest(rows, k, t)


@dataclass(frozen=True)
class HiddenRequest:
    rows: list[list[int]]
    dtype: str | None


def parse_hidden(body: dict, limits: Limits) -> HiddenRequest:
    rows = _id_rows(body, limits)
    dtype = body.get("dtype")
    if dtype is not None and dtype not in HIDDEN_DTYPES:
        raise RequestError(f"dtype must be null (the server's) or one of "
                           f"{', '.join(HIDDEN_DTYPES)}; got {dtype!r}", "dtype")
    return HiddenRequest(rows, dtype)


# ---- /v1/completions -----------------------------------------------------------------------
@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[list[int]]
    max_tokens: int
    sampling: Sampling
    seed: int | None
    prompt_logprobs: int | None
    logprobs: int | None
    token_id_keys: bool  # return_tokens_as_token_ids
    ignore_eos: bool

    @property
    def score_temperature(self) -> float:
        """The temperature of returned log-probs: the request's, T = 1 when greedy."""
        t = self.sampling.temperature
        return t if t > 0 else 1.0


def parse_completion(body: dict, limits: Limits,
                     tokenize: Callable[[str, bool], list[int]]) -> CompletionRequest:
    check_model(body, limits)
    if body.get("stream"):
        raise RequestError("stream is not supported by kdk serve-teacher; send stream: false",
                           "stream")
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1) or isinstance(body.get(name), bool):
            raise RequestError(f"{name} must be 1 (one completion per prompt; send the prompt "
                               f"again for more); got {body.get(name)!r}", name)
    if body.get("echo"):
        raise RequestError("echo is not supported; use prompt_logprobs", "echo")
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("prompt is required: token ids, a list of id lists, a string or a "
                           "list of strings", "prompt")
    special = flag(body, "add_special_tokens", True)
    rows = token_rows(body["prompt"], "prompt", limits, lambda s: tokenize(s, special))
    max_tokens = integer(body, "max_tokens", None, lo=0, hi=limits.max_new_tokens,
                         hi_flag="--max-new-tokens")
    if max_tokens is None:  # OpenAI's default, within the server's limit
        max_tokens = min(DEFAULT_MAX_TOKENS, limits.max_new_tokens)
    # the last generated token is never fed back, so it needs no position of its own
    longest = max(len(r) for r in rows)
    if max_tokens > 1 and longest + max_tokens - 1 > limits.max_model_len:
        raise RequestError(f"a prompt of {longest} tokens plus max_tokens {max_tokens} does "
                           f"not fit the model's max_model_len {limits.max_model_len}; ask "
                           f"for at most {limits.max_model_len - longest + 1} tokens",
                           "max_tokens")
    sampling = Sampling(temperature=number(body, "temperature", 1.0, 0.0),
                        top_p=number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                        top_k=_sampling_top_k(body))
    seed = integer(body, "seed", None)
    flag(body, "return_token_ids", False)  # checked only: the ids are always returned
    return CompletionRequest(
        rows, max_tokens, sampling, seed,
        prompt_logprobs=logprob_count(body, "prompt_logprobs", limits),
        logprobs=logprob_count(body, "logprobs", limits),
        token_id_keys=flag(body, "return_tokens_as_token_ids", False),
        ignore_eos=flag(body, "ignore_eos", False))


def _sampling_top_k(body: dict) -> int:
    k = integer(body, "top_k", 0, lo=-1)  # vLLM: -1 or 0 = the whole vocabulary
    return 0 if k is None or k < 0 else k


def _lp(x: float) -> float:
    return x if x > VLLM_CLAMP else VLLM_CLAMP  # -inf (and NaN) -> vLLM's clamp


def prompt_logprobs(row: list[int], scores: RowLogprobs | None, k: int,
                    text: Callable[[int], str]) -> list[dict | None]:
    """vLLM's prompt_logprobs of one prompt: entry 0 null; entry i (i >= 1) scores row[i]
    from row i - 1 of ``scores``: the actual token first (with its true rank), then the top
    K by rank (an actual token inside the top K keeps its first place and takes the top-K
    values, as vLLM's dict does)."""
    out: list[dict | None] = [None]
    if scores is None:
        return out
    ids, lps = scores.top_ids.tolist(), scores.top_lps.tolist()
    tok_lps, ranks = scores.token_lps.tolist(), scores.token_ranks.tolist()
    for i in range(1, len(row)):
        a = row[i]
        entry = {str(a): {"logprob": _lp(tok_lps[i - 1]), "rank": ranks[i - 1],
                          "decoded_token": text(a)}}
        for r, (t, v) in enumerate(zip(ids[i - 1][:k], lps[i - 1][:k], strict=True), 1):
            entry[str(t)] = {"logprob": _lp(v), "rank": r, "decoded_token": text(t)}
        out.append(entry)
    return out


def generated_logprobs(tokens: list[int], steps: list[RowLogprobs], k: int, token_id_keys: bool,
                       text: Callable[[int], str]) -> dict:
    """The OpenAI completions ``logprobs`` block of the generated tokens: per token its key
    (the decoded text, or "token_id:N" with return_tokens_as_token_ids), its log-prob, and
    the top K plus the token itself."""
    def key(t: int) -> str:
        return f"token_id:{t}" if token_id_keys else text(t)

    keys, token_lps, tops, offsets, at = [], [], [], [], 0
    for t, step in zip(tokens, steps, strict=True):
        lp = _lp(float(step.token_lps[0]))
        top = {key(t): lp}
        for i, v in zip(step.top_ids[0, :k].tolist(), step.top_lps[0, :k].tolist(), strict=True):
            top[key(i)] = _lp(v)
        keys.append(key(t))
        token_lps.append(lp)
        tops.append(top)
        offsets.append(at)
        at += len(text(t))
    return {"tokens": keys, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


@dataclass
class Choice:
    prompt: list[int]
    tokens: list[int]  # generated
    steps: list[RowLogprobs]  # one per generated token
    finish_reason: str
    scores: RowLogprobs | None  # the prompt's rows 0..L-2 scored against row[1:]


def completion_response(req: CompletionRequest, choices: list[Choice], model_id: str,
                        text: Callable[[int], str],
                        decode: Callable[[list[int]], str]) -> dict:
    out = []
    for n, c in enumerate(choices):
        out.append({
            "index": n, "text": decode(c.tokens),
            "logprobs": (None if req.logprobs is None else
                         generated_logprobs(c.tokens, c.steps, req.logprobs, req.token_id_keys,
                                            text)),
            "finish_reason": c.finish_reason, "stop_reason": None,
            "prompt_logprobs": (None if req.prompt_logprobs is None else
                                prompt_logprobs(c.prompt, c.scores, req.prompt_logprobs, text)),
            "prompt_token_ids": c.prompt, "token_ids": c.tokens})
    prompt_tokens = sum(len(c.prompt) for c in choices)
    completion_tokens = sum(len(c.tokens) for c in choices)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model_id, "choices": out,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
