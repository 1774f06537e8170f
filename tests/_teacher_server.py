"""A real HTTP server on loopback (port 0) that answers like a teacher server, scripted per
test: by default it speaks vLLM's /v1/completions (answers rendered by hand from a numpy
table, tests/_teacher_formats.py), SGLang's /generate and kdk serve-teacher's safetensors
routes; ``on(path, fn)`` replaces an answer (a 500, a delay, a truncated or corrupt body...).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from tests import _teacher_formats as fmt

MODEL_ID = "scripted-model"


@dataclass
class Reply:
    status: int = 200
    body: Any = None               # dict/list -> JSON, bytes -> as is
    content_type: str = "application/json"
    delay: float = 0.0             # seconds before answering
    truncate: int | None = None    # send only this many bytes (Content-Length promises all)


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class CharTokenizer:
    """A tokenizer stub with the HF interface the client reads (encode, name_or_path, len)."""

    def __init__(self, vocab: int, name: str = "char-tokenizer", shift: int = 0) -> None:
        self.vocab, self.name_or_path, self.shift = vocab, name, shift

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [(ord(c) + self.shift) % (self.vocab - 1) + 1 for c in text]
        return ([0] if add_special_tokens else []) + ids

    def __len__(self) -> int:
        return self.vocab


class ScriptedServer:
    def __init__(self, vocab: int = 13, seed: int = 0, tokenizer: CharTokenizer | None = None,
                 hidden: int = 6) -> None:
        rng = np.random.default_rng(seed)
        # the "model": the distribution after token x is table_of[x] (a bigram teacher)
        self.table_of = fmt.log_softmax_table(rng, 1, vocab, vocab)[0]
        self.vocab, self.hidden_size = vocab, hidden
        self.embed = torch.from_numpy(rng.normal(size=(vocab, hidden)).astype(np.float32))
        self.head_weight = torch.from_numpy(rng.normal(size=(vocab, hidden)).astype(np.float32))
        self.tokenizer = tokenizer
        self.models_extra: dict[str, Any] = {}
        self.overrides: dict[str, Callable[[Seen, int], Reply | None]] = {}
        self.seen: list[Seen] = []
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def on(self, path: str, fn: Callable[[Seen, int], Reply | None]) -> None:
        """Answer ``path`` with ``fn(request, n)`` (n: earlier requests to the path); None
        falls back to the default answer."""
        self.overrides[path] = fn

    def count(self, path: str) -> int:
        return sum(s.path == path for s in self.seen)

    def table(self, prompts: np.ndarray) -> np.ndarray:
        return self.table_of[np.asarray(prompts)]

    def expected(self, prompts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return fmt.expected_targets(self.table(prompts), k)

    # ---- default answers -------------------------------------------------------------------
    def answer(self, req: Seen) -> Reply:
        body = req.body if isinstance(req.body, dict) else {}
        if req.path == "/v1/models":
            return Reply(body={"object": "list", "data": [
                {"id": MODEL_ID, "object": "model", "max_model_len": 256,
                 **self.models_extra}]})
        if req.path == "/tokenize" and self.tokenizer is not None:
            ids = self.tokenizer.encode(body["prompt"], body.get("add_special_tokens", True))
            return Reply(body={"tokens": ids, "count": len(ids), "max_model_len": 256})
        if req.path == "/v1/completions":
            if isinstance(body.get("prompt"), str):
                if self.tokenizer is None:
                    return Reply(400, {"error": {"message": "no tokenizer", "code": 400}})
                ids = self.tokenizer.encode(body["prompt"])
                return Reply(body={"choices": [{"index": 0, "text": "", "prompt_token_ids": ids,
                                                "logprobs": None, "prompt_logprobs": None}]})
            return Reply(body=self.completion(body))
        if req.path == "/generate":
            prompts = np.array(body["input_ids"])
            k = body["top_logprobs_num"]
            if body.get("return_flat_raw_top_logprobs"):
                return Reply(body=fmt.sglang_flat(self.table(prompts), prompts, k))
            return Reply(body=fmt.sglang_nested(self.table(prompts), prompts, k))
        if req.path == "/v1/topk":
            prompts = np.array(body["input_ids"])
            ids, lps = self.expected(prompts, body["top_k"])
            return self.tensors({"ids": torch.from_numpy(ids), "logprobs": torch.from_numpy(lps)})
        if req.path == "/v1/hidden":
            h = self.embed[torch.tensor(body["input_ids"])]
            if body.get("dtype") == "bfloat16":
                h = h.to(torch.bfloat16)
            return self.tensors({"hidden": h})
        if req.path == "/v1/head":
            return self.tensors({"weight": self.head_weight},
                                {"logit_scale": "0.5", "final_logit_softcap": "none",
                                 "model": MODEL_ID})
        return Reply(404, {"error": {"message": f"no route {req.path}", "code": 404}})

    def completion(self, body: dict) -> dict:
        prompts = np.array(body["prompt"])
        k = body["prompt_logprobs"]
        return fmt.vllm_completion(self.table(prompts), prompts, k, [0] * len(prompts))

    @staticmethod
    def tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Reply:
        return Reply(body=save_safetensors(tensors, metadata=meta),
                     content_type="application/octet-stream")

    # ---- HTTP ------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                req = Seen(self.command, self.path, json.loads(raw) if raw else None,
                           dict(self.headers.items()))
                with server._lock:
                    prior = server.count(req.path)
                    server.seen.append(req)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    fn = server.overrides.get(req.path)
                    reply = (fn(req, prior) if fn else None) or server.answer(req)
                    time.sleep(reply.delay or server.delay)
                    data = reply.body if isinstance(reply.body, bytes) else \
                        json.dumps(reply.body).encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data if reply.truncate is None else data[:reply.truncate])
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            do_GET = do_POST = _serve

        return Handler
