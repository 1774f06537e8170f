"""The FastAPI application of `kdk serve-teacher`: vLLM's /v1/completions subset (enough for
vLLM clients and TRL's VLLMClient), /v1/topk and /v1/hidden for kdkernels' own client,
/v1/head, /v1/models, /health, and /v1/stats (the batcher's counters)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from safetensors.torch import save as safetensors_bytes

from . import protocol, scoring
from .batcher import Batcher
from .generation import Generated, Generation, generator
from .model import ServedModel
from .protocol import RequestError

log = logging.getLogger("kdkernels.serve")
BINARY = "application/octet-stream"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None
    max_logprobs: int = 256
    max_batch_tokens: int = 8192
    max_request_tokens: int = 65536
    max_new_tokens: int = 1024


def create_app(served: ServedModel, settings: Settings) -> FastAPI:
    """The app; its worker thread starts now and stops when the app shuts down."""
    batcher = Batcher(served.hidden, settings.max_batch_tokens)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="kdk serve-teacher", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.served, app.state.batcher = served, batcher
    limits = protocol.Limits(served.name, served.vocab_size, served.max_model_len,
                             settings.max_logprobs, settings.max_request_tokens,
                             settings.max_new_tokens)
    _add_auth(app, settings.api_key)
    _add_errors(app)
    _add_info_routes(app, served, limits, batcher)
    _add_scoring_routes(app, served, limits, batcher)
    _add_completions(app, served, limits, batcher)
    return app


def _json(body: dict, status: int = 200) -> Response:
    return Response(protocol.dumps(body), status_code=status, media_type="application/json")


async def _body(request: Request) -> dict:
    return protocol.parse_json(await request.body())


def _add_auth(app: FastAPI, api_key: str | None) -> None:
    if api_key is None:
        return
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def bearer(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                err = RequestError("missing or wrong API key: send the header "
                                   "'Authorization: Bearer KEY' with the server's --api-key",
                                   "Authorization", status=401, kind="AuthenticationError")
                return _json(err.body(), err.status)
        return await call_next(request)


def _add_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(_request: Request, err: RequestError) -> Response:
        return _json(err.body(), err.status)

    @app.exception_handler(Exception)
    async def failed(_request: Request, err: Exception) -> Response:
        log.exception("kdk serve-teacher: request failed")
        body = {"error": {"message": f"{type(err).__name__}: {err}",
                          "type": "InternalServerError", "param": None, "code": 500}}
        return JSONResponse(body, status_code=500)


def _add_info_routes(app: FastAPI, served: ServedModel, limits: protocol.Limits,
                     batcher: Batcher) -> None:
    head_bytes: list[bytes] = []  # built on the first request, then reused

    @app.get("/health")
    async def health() -> Response:
        return _json({})

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _json({"object": "list", "data": [{
            "id": served.name, "object": "model", "owned_by": "kdkernels",
            "max_model_len": served.max_model_len, "vocab_size": served.vocab_size,
            "hidden_size": served.hidden_size, "max_logprobs": limits.max_logprobs}]})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        # vLLM's route (the clients' tokenizer probe): text -> the served tokenizer's ids, with
        # no model forward, so a probe longer than max_model_len still answers
        body = await _body(request)
        protocol.check_model(body, limits)
        text = body.get("prompt")
        if not isinstance(text, str):
            raise RequestError("'prompt' must be a string", "prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise RequestError("'add_special_tokens' must be true or false", "add_special_tokens")
        ids = _tokenizer(served)(text, special)
        return _json({"count": len(ids), "max_model_len": served.max_model_len, "tokens": ids,
                      "token_strs": None})

    @app.get("/v1/stats")
    async def stats() -> Response:
        return _json(batcher.stats.as_dict())

    @app.get("/v1/head")
    async def head() -> Response:
        if not head_bytes:
            head_bytes.append(await asyncio.to_thread(_head_bytes, served))
        return Response(head_bytes[0], media_type=BINARY)


def _head_bytes(served: ServedModel) -> bytes:
    h = served.head
    tensors = {"weight": h.weight.detach().cpu().contiguous()}
    if h.bias is not None:
        tensors["bias"] = h.bias.detach().cpu().contiguous()
    meta = {"logit_scale": repr(float(h.scale)),
            "final_logit_softcap": "none" if h.softcap is None else repr(float(h.softcap)),
            "model": served.name}
    return safetensors_bytes(tensors, metadata=meta)


def _add_scoring_routes(app: FastAPI, served: ServedModel, limits: protocol.Limits,
                        batcher: Batcher) -> None:
    @app.post("/v1/topk")
    async def topk(request: Request) -> Response:
        req = protocol.parse_topk(await _body(request), limits)
        hidden = await batcher.hidden(req.rows)
        data = await asyncio.to_thread(_topk_bytes, served, hidden, req)
        return Response(data, media_type=BINARY)

    @app.post("/v1/hidden")
    async def hidden_states(request: Request) -> Response:
        req = protocol.parse_hidden(await _body(request), limits)
        hidden = await batcher.hidden(req.rows)
        dtype = served.dtype if req.dtype is None else TORCH_DTYPES[req.dtype]
        data = await asyncio.to_thread(
            lambda: safetensors_bytes({"hidden": torch.stack(hidden).to(dtype).cpu()
                                       .contiguous()}))
        return Response(data, media_type=BINARY)


def _topk_bytes(served: ServedModel, hidden: list[torch.Tensor],
                req: protocol.TopKRequest) -> bytes:
    ids, lps = zip(*(scoring.topk_table(served.head, h, req.top_k, req.temperature)
                     for h in hidden), strict=True)
    return safetensors_bytes({"ids": torch.stack(ids).contiguous(),
                              "logprobs": torch.stack(lps).contiguous()})


def _add_completions(app: FastAPI, served: ServedModel, limits: protocol.Limits,
                     batcher: Batcher) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _body(request)
        req = protocol.parse_completion(body, limits, _tokenizer(served))
        if req.max_tokens <= 1:  # scoring (TRL sends max_tokens 1): batched with others
            hidden = await batcher.hidden(req.prompts)
            done = await asyncio.to_thread(_first_tokens, served, req, hidden)
        else:
            stop = None if req.ignore_eos else served.eos_id
            tasks = [Generation(served, p, req.max_tokens, req.sampling, req.logprobs or 0,
                                generator(req.seed, served.device), stop)
                     for p in req.prompts]
            done = await asyncio.gather(*(batcher.run(t) for t in tasks))
        # off the event loop: a long prompt with many log-probs is a large JSON document
        data = await asyncio.to_thread(_completion_bytes, served, req, done)
        return Response(data, media_type="application/json")


def _tokenizer(served: ServedModel):
    def tokenize(text: str, add_special_tokens: bool) -> list[int]:
        try:
            return served.encode(text, add_special_tokens)
        except ValueError as err:
            raise RequestError(str(err), "prompt") from None
    return tokenize


def _first_tokens(served: ServedModel, req: protocol.CompletionRequest,
                  hidden: list[torch.Tensor]) -> list[Generated]:
    """max_tokens 0 or 1: the prompt's hidden states and at most one token from the last."""
    out = []
    for h in hidden:
        g = Generated(h)
        if req.max_tokens == 1:
            row = scoring.next_token(served.head, h[-1], req.sampling, req.logprobs or 0,
                                     generator(req.seed, served.device))
            g.tokens.append(int(row.tokens[0]))
            g.steps.append(row)
            if not req.ignore_eos and g.tokens[0] == served.eos_id:
                g.finish_reason = "stop"
        out.append(g)
    return out


def _completion_bytes(served: ServedModel, req: protocol.CompletionRequest,
                      done: list[Generated]) -> bytes:
    choices = _choices(served, req, done)
    return protocol.dumps(protocol.completion_response(req, choices, served.name,
                                                       served.token_text, served.decode_ids))


def _choices(served: ServedModel, req: protocol.CompletionRequest,
             done: list[Generated]) -> list[protocol.Choice]:
    out = []
    for prompt, g in zip(req.prompts, done, strict=True):
        scores = None
        if req.prompt_logprobs is not None and len(prompt) > 1:
            targets = torch.tensor(prompt[1:])
            scores = scoring.rows_with_tokens(served.head, g.prompt_hidden[:-1], targets,
                                              req.prompt_logprobs, req.score_temperature)
        out.append(protocol.Choice(prompt, g.tokens, g.steps, g.finish_reason, scores))
    return out
