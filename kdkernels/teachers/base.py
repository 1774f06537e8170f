"""What every served teacher shares: batch splitting, the request pool, the server's facts
(model id, vocabulary, K limit) and the tokenizer probe.

``score(input_ids [B, L])`` returns ``(ids int32 [B, L, K], logprobs float32 [B, L, K])`` on
the CPU in the convention of ``kdk cache-teacher``: position t holds the teacher's T = 1
distribution of the token after ``input_ids[t]``, most likely first, an empty slot being id -1
with log-prob 0. A row is never split (its positions need the whole prefix): the rows of a
batch are grouped into requests of at most ``max_tokens_per_request`` tokens, run on a pool of
``concurrency`` threads and put back in order.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import TeacherRequestError, TeacherResponseError
from .slots import empty_targets
from .transport import TeacherStats, Transport, json_body

T = TypeVar("T")

# Words, digits, punctuation, accents, CJK and whitespace: tokenizers that differ in their
# vocabulary or their normalisation split this text differently.
PROBE_TEXT = "kdkernels probe: Hello, world! 0123 456789 naïve café Δx ≤ 1 東京\n\tend."
_CAP = re.compile(r"max[-_ ]?logprobs|max(imum)? allowed", re.IGNORECASE)


def logprob_cap_refusal(err: TeacherRequestError, url: str, k: int) -> ValueError | None:
    """The ``ValueError`` for a 400 that says K exceeds the server's log-prob limit (vLLM:
    "Requested prompt logprobs of 64, which is greater than max allowed: 20"; kdk
    serve-teacher names --max-logprobs), else None."""
    msg = err.server_message
    if err.status != 400 or "logprob" not in msg.lower() or not _CAP.search(msg):
        return None
    return ValueError(f"the teacher at {url} refused top_k={k}: {msg!r}. Start the server "
                      f"with --max-logprobs {k} or more (vLLM's default is 20), or ask for a "
                      f"smaller top_k")


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    out = tokenizer.encode(text, add_special_tokens=special)
    return [int(i) for i in getattr(out, "ids", out)]  # tokenizers.Tokenizer gives an Encoding


def _probe_text(tokenizer: Any, max_model_len: Any) -> str:
    """PROBE_TEXT, cut at a space to the longest prefix that fits the served model's context
    (a short-context teacher refuses a longer prompt on the completions route)."""
    if not isinstance(max_model_len, int) or isinstance(max_model_len, bool):
        return PROBE_TEXT
    words = PROBE_TEXT.split(" ")
    for n in range(len(words), 0, -1):
        text = " ".join(words[:n])
        if len(_encode(tokenizer, text, True)) < max_model_len:
            return text
    return words[0]


class TeacherClient:
    """A teacher behind an HTTP server. Subclasses implement ``_score_rows`` (one request)
    and name their tokenizer probe routes in ``probe_routes``."""

    server = "teacher"
    probe_routes: Sequence[str] = ("tokenize", "completions")

    def __init__(self, url: str, top_k: int = 64, timeout: float = 60.0, retries: int = 3, *,
                 model: str | None = None, api_key: str | None = None, tokenizer: Any = None,
                 vocab_size: int | None = None, max_tokens_per_request: int = 8192,
                 concurrency: int = 4, backoff: float = 0.5) -> None:
        def positive_int(name: str, value: Any, low: int = 1) -> int:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
                    value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
            return int(value)

        self.top_k = positive_int("top_k", top_k)
        retries = positive_int("retries", retries, 0)
        self.max_tokens_per_request = positive_int("max_tokens_per_request",
                                                   max_tokens_per_request)
        self.concurrency = positive_int("concurrency", concurrency)
        if vocab_size is not None:
            vocab_size = positive_int("vocab_size", vocab_size)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if not backoff >= 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}")
        self.stats = TeacherStats()
        self._transport = Transport(url, timeout=timeout, retries=retries, backoff=backoff,
                                    api_key=api_key, stats=self.stats)
        self.url = self._transport.endpoint.base
        self.tokenizer = tokenizer
        self._model = model
        self._vocab_size = vocab_size
        self._info: dict[str, Any] | None = None
        self._ready = False
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    # ---- the server's facts -----------------------------------------------------------------
    def _model_entry(self) -> dict[str, Any]:
        """The served model's entry of /v1/models (the one named by ``model=`` if given)."""
        with self._lock:
            if self._info is None:
                self._info = self._fetch_model_entry()
            return self._info

    def _fetch_model_entry(self) -> dict[str, Any]:
        where = self._transport.url_of("/v1/models")
        body = self.get_json("/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not data or not all(
                isinstance(d, dict) and isinstance(d.get("id"), str) for d in data):
            raise TeacherResponseError(f"{where}: expected {{'data': [{{'id': str, ...}}]}}, "
                                       f"got {str(body)[:200]}")
        if self._model is None:
            return data[0]
        for entry in data:
            if entry["id"] == self._model:
                return entry
        raise ValueError(f"model={self._model!r} is not served at {self.url}: it serves "
                         f"{[d['id'] for d in data]}")

    @property
    def model_id(self) -> str:
        """The served model's id (/v1/models ``data[0].id``, or ``model=`` when given)."""
        return str(self._model_entry()["id"])

    @property
    def vocab_size(self) -> int | None:
        """``vocab_size=``, else ``len(tokenizer)``, else the server's /v1/models
        ``vocab_size`` (kdk serve-teacher reports it; vLLM and SGLang do not)."""
        if self._vocab_size is not None:
            return self._vocab_size
        if self.tokenizer is not None and hasattr(self.tokenizer, "__len__"):
            return len(self.tokenizer)
        v = self._model_entry().get("vocab_size")
        return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    def check(self) -> None:
        """Refuse the settings the server cannot meet, once: K above its reported
        ``max_logprobs``, a tokenizer that differs from the local one."""
        with self._check_lock:
            if not self._ready:
                self._check()
                self._ready = True

    def _check(self) -> None:
        entry = self._model_entry()
        cap = entry.get("max_logprobs")
        if isinstance(cap, int) and not isinstance(cap, bool) and self.top_k > cap:
            raise ValueError(f"top_k={self.top_k} exceeds the teacher's limit at {self.url} "
                             f"(max_logprobs {cap}): start the server with --max-logprobs "
                             f"{self.top_k} or more, or ask for a smaller top_k")
        if self.tokenizer is not None:
            self._check_tokenizer()

    # ---- the tokenizer probe ----------------------------------------------------------------
    def _check_tokenizer(self) -> None:
        tok = self.tokenizer
        text = _probe_text(tok, self._model_entry().get("max_model_len"))
        local = [_encode(tok, text, False), _encode(tok, text, True)]
        server_ids, route = None, None
        for route in self.probe_routes:
            server_ids = self._server_tokens(route, text)
            if server_ids is not None:
                break
        name = getattr(tok, "name_or_path", None) or type(tok).__name__
        if server_ids is None:
            warnings.warn(f"the teacher at {self.url} ({self.model_id!r}) tokenizes no probe "
                          f"text through {list(self.probe_routes)}: the local tokenizer "
                          f"{name!r} is not checked against it", stacklevel=3)
            return
        if server_ids not in local:
            raise ValueError(
                f"tokenizer mismatch: the teacher at {self.url} serves {self.model_id!r}, whose "
                f"tokenizer ({route} route) gives {server_ids[:24]} for the probe text "
                f"{text!r}; the local tokenizer {name!r} gives {local[0][:24]}. Pass the "
                f"teacher's own tokenizer (the ids sent are read as the teacher's tokens)")

    def _server_tokens(self, route: str, text: str) -> list[int] | None:
        """The server's ids of ``text`` through ``route``, None where the route is missing or
        says nothing of the ids."""
        try:
            if route == "tokenize":
                body = self.post_json("/tokenize", {"model": self.model_id, "prompt": text,
                                                    "add_special_tokens": False})
                ids = body.get("tokens") if isinstance(body, dict) else None
            elif route == "completions":
                body = self.post_json("/v1/completions", {
                    "model": self.model_id, "prompt": text, "max_tokens": 1,
                    "temperature": 1.0, "return_token_ids": True})
                choices = body.get("choices") if isinstance(body, dict) else None
                ids = choices[0].get("prompt_token_ids") if isinstance(choices, list) and \
                    choices and isinstance(choices[0], dict) else None
            else:
                ids = self._route_tokens(route, text)
        except TeacherRequestError as e:
            # a missing route (404/405) or one that cannot tokenize text (400/422): try the next
            if e.status in (400, 404, 405, 422):
                return None
            raise
        if ids is None:
            return None
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise TeacherResponseError(f"{self.url} ({route} route): expected a list of token "
                                       f"ids for the probe text, got {str(ids)[:200]}")
        return ids

    def _route_tokens(self, route: str, text: str) -> list[int] | None:
        raise ValueError(f"{type(self).__name__} has no tokenizer probe route {route!r}")

    # ---- requests ---------------------------------------------------------------------------
    def post_json(self, path: str, payload: Any) -> Any:
        return self._transport.call("POST", path, payload, parse=json_body)

    def get_json(self, path: str) -> Any:
        return self._transport.call("GET", path, parse=json_body)

    def as_rows(self, input_ids: Any) -> np.ndarray:
        """``input_ids`` [B, L] as int64 numpy, checked (integers, >= 0, < the vocabulary)."""
        if isinstance(input_ids, torch.Tensor):
            if input_ids.is_floating_point() or input_ids.is_complex():
                raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
            x = input_ids.detach().cpu().to(torch.int64).numpy()
        else:
            x = np.asarray(input_ids)
            if x.size and not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"input_ids must hold integer token ids, got {x.dtype}")
            x = x.astype(np.int64)
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, L] with L >= 1, got shape {list(x.shape)}")
        vocab = self.vocab_size if x.size else None
        if x.size and (x.min() < 0 or (vocab is not None and x.max() >= vocab)):
            bad = np.argwhere((x < 0) | (x >= (vocab if vocab is not None else 2**62)))[0]
            raise ValueError(f"input_ids[{bad[0]}, {bad[1]}] = {x[bad[0], bad[1]]} is not a "
                             f"token id in [0, {vocab if vocab is not None else 'vocab'})")
        return x

    def split(self, rows: int, length: int) -> list[tuple[int, int]]:
        """[start, stop) row ranges of at most ``max_tokens_per_request`` tokens each."""
        per = self.max_tokens_per_request // length
        if per == 0:
            raise ValueError(f"a row of {length} tokens exceeds max_tokens_per_request="
                             f"{self.max_tokens_per_request}: raise it (a row cannot be split, "
                             f"its positions need the whole prefix)")
        return [(s, min(s + per, rows)) for s in range(0, rows, per)]

    def run(self, fn: Callable[[int, int], T], ranges: Sequence[tuple[int, int]]) -> list[T]:
        """``fn(start, stop)`` for each range, on the pool, in order; the first failure
        cancels what has not started and is raised."""
        if self._closed:
            raise RuntimeError(f"the client of {self.url} is closed")
        if len(ranges) <= 1 or self.concurrency == 1:
            return [fn(s, e) for s, e in ranges]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency,
                                                thread_name_prefix=f"kdk-{self.server}")
            pool = self._pool
        futures: list[Future[T]] = [pool.submit(fn, s, e) for s, e in ranges]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def score(self, input_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids int32 [B, L, K], logprobs float32 [B, L, K])`` of ``input_ids`` [B, L]."""
        x = self.as_rows(input_ids)
        self.check()
        B, L = x.shape
        ids, lps = empty_targets(B, L, self.top_k)
        ranges = self.split(B, L) if B else []
        try:
            parts = self.run(lambda s, e: self._score_rows(x[s:e], s), ranges)
        except TeacherRequestError as e:
            refusal = logprob_cap_refusal(e, self.url, self.top_k)
            if refusal is not None:
                raise refusal from e
            raise
        for (s, e), (i, lp) in zip(ranges, parts, strict=True):
            ids[s:e], lps[s:e] = i, lp
        self._transport.count_tokens(B * L)
        return torch.from_numpy(ids), torch.from_numpy(lps)

    def _score_rows(self, rows: np.ndarray, row_offset: int) -> tuple[np.ndarray, np.ndarray]:
        """One request: validated (ids, logprobs) [b, L, K] of ``rows`` [b, L]."""
        raise NotImplementedError

    # ---- life -------------------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, top_k={self.top_k})"
