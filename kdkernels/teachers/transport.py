"""One HTTP call to a teacher server: bounded in time, retried with backoff, counted.

Only the standard library (http.client): the client adds no dependency. Each call opens its own
connection, so calls run safely from a thread pool; a keep-alive connection the server closed
while idle would otherwise cost a retry with its backoff.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .errors import TeacherRequestError, TeacherResponseError, TeacherUnavailable

T = TypeVar("T")
READ_CHUNK = 1 << 16


@dataclass
class TeacherStats:
    """What a client spent on its server. ``requests`` counts logical requests (one per call,
    whatever its retries), so the HTTP attempts are ``requests + retries``; ``seconds`` sums the
    wall time of the calls (retries and backoff included; concurrent calls add up)."""

    requests: int = 0
    retries: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    tokens: int = 0


class MalformedBody(Exception):
    """A body that cannot be decoded (retried like a connection error)."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(str(url).strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must look like http://HOST:PORT (or https://...), got {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise ValueError(f"url {url!r} has a bad port: {e}") from None
        prefix = parts.path.rstrip("/")
        # OpenAI clients are given ".../v1"; the routes here carry their own /v1.
        if prefix.endswith("/v1"):
            prefix = prefix[:-3]
        return cls(parts.scheme, parts.hostname, port, prefix)

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


def server_message(body: bytes) -> str:
    """The message of an error body: vLLM's {"error": {"message"}}, its older {"message"},
    FastAPI's {"detail"}, else the text itself."""
    text = body.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if key in obj:
                return str(obj[key])
    return text.strip()[:500]


class Transport:
    """HTTP calls to one server with a timeout per call, a bearer key, and ``retries`` retries
    (backoff * 2**attempt seconds apart) on connection errors, timeouts, 5xx and undecodable
    bodies; 4xx raise ``TeacherRequestError`` at once."""

    def __init__(self, url: str, *, timeout: float, retries: int, backoff: float,
                 api_key: str | None, stats: TeacherStats) -> None:
        self.endpoint = Endpoint.parse(url)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.api_key = api_key
        self.stats = stats
        self._lock = threading.Lock()

    def url_of(self, path: str) -> str:
        return self.endpoint.base + path

    def call(self, method: str, path: str, payload: Any = None, *,
             parse: Callable[[bytes], T]) -> T:
        """``parse(body)`` of the first good answer; ``parse`` raising (any exception) marks
        the body malformed, which is retried."""
        url = self.url_of(path)
        body = None if payload is None else json.dumps(payload).encode()
        start = time.monotonic()
        last, last_is_body = "", False
        attempts = self.retries + 1
        try:
            for attempt in range(attempts):
                if attempt:
                    self._count(retries=1)
                    time.sleep(self.backoff * 2 ** (attempt - 1))
                try:
                    status, data = self._attempt(method, path, body)
                except http.client.IncompleteRead as e:
                    self._count(received=len(e.partial))
                    got = len(e.partial)
                    want = got + (e.expected or 0)
                    last, last_is_body = f"truncated body ({got} of {want} bytes)", True
                    continue
                except TimeoutError:
                    last, last_is_body = f"timed out (timeout={self.timeout:g} s)", False
                    continue
                except (OSError, http.client.HTTPException) as e:
                    last, last_is_body = f"{type(e).__name__}: {e}", False
                    continue
                self._count(received=len(data))
                if status >= 500:
                    last, last_is_body = f"HTTP {status}: {server_message(data)[:200]}", False
                    continue
                if not 200 <= status < 300:
                    msg = server_message(data)
                    raise TeacherRequestError(
                        f"the teacher at {url} refused the request: HTTP {status}: {msg}",
                        url=url, status=status, server_message=msg)
                try:
                    return parse(data)
                except Exception as e:  # noqa: BLE001 - any decode failure is a bad body
                    last, last_is_body = f"malformed body ({type(e).__name__}: {e})", True
                    continue
        finally:
            self._count(requests=1, seconds=time.monotonic() - start)
        what = (f"after {attempts} attempt(s) ({self.retries} retries, timeout "
                f"{self.timeout:g} s): last {last}")
        if last_is_body:
            raise TeacherResponseError(f"the teacher at {url} sent no usable body {what}")
        raise TeacherUnavailable(f"the teacher at {url} is unavailable {what}")

    def _attempt(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        ep = self.endpoint
        cls = http.client.HTTPSConnection if ep.scheme == "https" else http.client.HTTPConnection
        conn = cls(ep.host, ep.port, timeout=self.timeout)
        headers = {"Accept": "application/json, application/octet-stream",
                   "User-Agent": "kdkernels-teacher-client"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        # The socket timeout bounds each wait; the deadline bounds the whole answer, so a
        # server trickling bytes cannot hold a call forever.
        deadline = time.monotonic() + self.timeout
        try:
            conn.request(method, ep.prefix + path, body=body, headers=headers)
            resp = conn.getresponse()
            chunks = []
            while True:
                chunk = resp.read(READ_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError("timed out")
            data = b"".join(chunks)
            # read(n) returns b"" at a closed connection even when Content-Length promised
            # more: a body cut short is caught here.
            if resp.length:
                raise http.client.IncompleteRead(data, resp.length)
            return resp.status, data
        finally:
            conn.close()

    def _count(self, *, requests: int = 0, retries: int = 0, received: int = 0,
               seconds: float = 0.0) -> None:
        with self._lock:
            self.stats.requests += requests
            self.stats.retries += retries
            self.stats.bytes_received += received
            self.stats.seconds += seconds

    def count_tokens(self, n: int) -> None:
        with self._lock:
            self.stats.tokens += n


def json_body(data: bytes) -> Any:
    """Decode a JSON body (a failure is a malformed body, retried)."""
    return json.loads(data.decode("utf-8"))
