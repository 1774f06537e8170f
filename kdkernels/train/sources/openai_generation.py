"""Generations with log-probs from an OpenAI-compatible endpoint (`/v1/completions` or
`/v1/chat/completions`): one request per prompt, parsed into ids where the server gives them
and token bytes where it gives only strings.

Requests ask for T = 1 samples (the teacher's own distribution, sequence-level KD) with the
top-K log-probs of every generated token: completions `logprobs: K`, chat `logprobs: true,
top_logprobs: K` (hosted APIs cap K at 20). They also ask vLLM's extras `return_token_ids`
(ids of the prompt and of the generated tokens) and `return_tokens_as_token_ids` (keys
"token_id:N" instead of decoded strings, which collide); an endpoint that refuses them (a 400
naming one, as OpenAI's does) is asked again without them, for the rest of the run.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

API_STYLES = ("completions", "chat")
EXTRAS = ("return_token_ids", "return_tokens_as_token_ids")
UNLIKELY = -9999.0  # vLLM's clamp of -inf: "not really a candidate"
ID_PREFIX = "token_id:"


def base_url(url: str) -> str:
    """http://host:port from any of http://host:port, .../, .../v1, .../v1/."""
    u = url.rstrip("/")
    return u[:-3] if u.endswith("/v1") else u


@dataclass
class Generated:
    """One generation. ``token_ids`` when the endpoint gave ids, else ``pieces`` (the bytes of
    each generated token). ``top[i]`` is the distribution of generated token i: (id or bytes,
    log-prob) pairs as the endpoint listed them."""

    text: str
    token_ids: list[int] | None
    pieces: list[bytes] | None
    top: list[list[tuple[int | bytes, float]]]
    prompt_ids: list[int] | None = None
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        return len(self.token_ids if self.token_ids is not None else self.pieces or [])


@dataclass
class Endpoint:
    """Where and how to ask. ``extras`` turns False once the endpoint refuses vLLM's extras."""

    url: str
    model: str
    api_style: str = "completions"
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 0.5
    extras: bool = True
    requests: int = 0
    retried: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def route(self) -> str:
        path = "/v1/completions" if self.api_style == "completions" else "/v1/chat/completions"
        return base_url(self.url) + path

    def body(self, prompt: list[int] | str, max_tokens: int, top_k: int, seed: int) -> dict:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens,
                                "temperature": 1.0, "seed": seed, "n": 1}
        if self.api_style == "completions":
            body.update(prompt=prompt, logprobs=top_k)
        else:
            body.update(messages=[{"role": "user", "content": prompt}], logprobs=True,
                        top_logprobs=top_k)
        if self.extras:
            body.update(dict.fromkeys(EXTRAS, True))
        return body

    def generate(self, prompt: list[int] | str, max_tokens: int, top_k: int, seed: int,
                 where: str) -> Generated:
        """POST one prompt (retrying connection errors, timeouts, 429/5xx and unreadable
        bodies with backoff) and parse the answer; errors name the URL and ``where``."""
        body = self.body(prompt, max_tokens, top_k, seed)
        reply = self._post(body, where)
        if isinstance(reply, _Refused):
            if EXTRAS[0] in body and any(x in reply.message for x in EXTRAS):
                # e.g. OpenAI's "Unrecognized request argument supplied"; other threads may
                # have sent theirs with the extras already: each asks again
                self.extras = False
                self.notes.append(f"{self.route} refused {' / '.join(EXTRAS)}; asked again "
                                  "without them (token strings are re-tokenised locally)")
                return self.generate(prompt, max_tokens, top_k, seed, where)
            raise ValueError(f"{self.route} answered {reply.status} for {where}: "
                             f"{reply.message}")
        return parse(reply, self.api_style, f"{self.route}, {where}")

    def _post(self, body: dict, where: str) -> dict | _Refused:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.requests += 1
            req = urllib.request.Request(self.route, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as err:
                text = _error_text(err)
                if err.code == 429 or err.code >= 500:
                    last = f"HTTP {err.code}: {text}"
                    continue
                return _Refused(err.code, text)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                continue
            try:
                reply = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                last = f"an unreadable body ({err}; {len(raw)} bytes)"
                continue
            if isinstance(reply, dict):
                return reply
            last = f"a JSON {type(reply).__name__}, not an object"
        raise RuntimeError(f"teacher endpoint {self.route} failed for {where} after "
                           f"{self.retries + 1} attempts; last: {last}")


@dataclass
class _Refused:
    status: int
    message: str


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        raw = err.read().decode("utf-8", "replace")
    except OSError:
        return str(err.reason)
    try:
        e = json.loads(raw)
        return str(e["error"]["message"] if isinstance(e.get("error"), dict) else e)
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        return raw[:500]


# -- parsing ---------------------------------------------------------------------------------
def parse(reply: dict, api_style: str, where: str) -> Generated:
    """A completions or chat response's first choice as a Generated (ids when given)."""
    try:
        choice = reply["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{where}: the response has no choices[0] (keys "
                         f"{sorted(reply)})") from None
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        raise ValueError(f"{where}: choices[0].logprobs is missing: the endpoint returned no "
                         "log-probs (does it support logprobs / top_logprobs?)")
    prompt_ids = choice.get("prompt_token_ids", reply.get("prompt_token_ids"))
    ids = choice.get("token_ids")
    if api_style == "completions":
        text = choice.get("text") or ""
        tokens, tops = _completions_entries(lp, where)
    else:
        text = (choice.get("message") or {}).get("content") or ""
        tokens, tops = _chat_entries(lp, where)
    if ids is not None:
        ids = [_int(i, f"{where}: choices[0].token_ids") for i in ids]
        if len(ids) != len(tops):
            raise ValueError(f"{where}: {len(ids)} token_ids but {len(tops)} log-prob entries")
    elif all(isinstance(t, int) for t in tokens):
        ids = list(tokens)  # "token_id:N" strings
    pieces = None if ids is not None else [t if isinstance(t, bytes) else b"" for t in tokens]
    if prompt_ids is not None:
        prompt_ids = [_int(i, f"{where}: prompt_token_ids") for i in prompt_ids]
    return Generated(text=text, token_ids=ids, pieces=pieces, top=tops, prompt_ids=prompt_ids,
                     finish_reason=choice.get("finish_reason"))


def _completions_entries(lp: dict, where: str):
    tokens = lp.get("tokens")
    tops = lp.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(tops, list) or len(tokens) != len(tops):
        raise ValueError(f"{where}: choices[0].logprobs needs tokens and top_logprobs lists "
                         "of one length (completions format)")
    keys = [_key(t, None, f"{where}: logprobs.tokens[{i}]") for i, t in enumerate(tokens)]
    rows = []
    for i, d in enumerate(tops):
        if d is None:
            rows.append([])
            continue
        if not isinstance(d, dict):
            raise ValueError(f"{where}: logprobs.top_logprobs[{i}] must be an object "
                             "{token: logprob}")
        rows.append([(_key(k, None, f"{where}: top_logprobs[{i}]"),
                      _logprob(v, f"{where}: top_logprobs[{i}][{k!r}]")) for k, v in d.items()])
    return keys, rows


def _chat_entries(lp: dict, where: str):
    content = lp.get("content")
    if not isinstance(content, list):
        raise ValueError(f"{where}: choices[0].logprobs.content must be a list (chat format)")
    keys, rows = [], []
    for i, c in enumerate(content):
        at = f"{where}: logprobs.content[{i}]"
        if not isinstance(c, dict) or "token" not in c:
            raise ValueError(f"{at} must be an object with token, logprob, bytes, "
                             "top_logprobs")
        keys.append(_key(c["token"], c.get("bytes"), at))
        row = []
        for j, t in enumerate(c.get("top_logprobs") or []):
            if not isinstance(t, dict) or "token" not in t:
                raise ValueError(f"{at}.top_logprobs[{j}] must be {{token, logprob, bytes}}")
            row.append((_key(t["token"], t.get("bytes"), f"{at}.top_logprobs[{j}]"),
                        _logprob(t.get("logprob"), f"{at}.top_logprobs[{j}].logprob")))
        rows.append(row)
    return keys, rows


def _key(token: Any, raw: Any, where: str) -> int | bytes:
    """An id ("token_id:N") or the token's bytes (the ``bytes`` list when given, else the
    string as UTF-8; OpenAI's legacy "bytes:\\xNN" spelling of a partial character too)."""
    if not isinstance(token, str):
        raise ValueError(f"{where}: token must be a string; got {token!r}")
    if token.startswith(ID_PREFIX):
        return _int(token[len(ID_PREFIX):], where)
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(b, int) and 0 <= b < 256
                                                for b in raw):
            raise ValueError(f"{where}: bytes must be a list of 0..255; got {raw!r}")
        return bytes(raw)
    if token.startswith("bytes:"):
        try:
            return token[6:].encode("latin-1").decode("unicode_escape").encode("latin-1")
        except (UnicodeDecodeError, UnicodeEncodeError):
            pass
    return token.encode("utf-8")


def _int(value: Any, where: str) -> int:
    try:
        i = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a token id; got {value!r}") from None
    if i < 0 or (isinstance(value, float) and value != i):
        raise ValueError(f"{where}: expected a token id >= 0; got {value!r}")
    return i


def _logprob(value: Any, where: str) -> float:
    if value is None:
        return -math.inf
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number; got {value!r}") from None
