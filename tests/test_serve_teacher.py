"""`kdk serve-teacher` for real: the CLI in a subprocess on loopback (--port 0, the port read
from --port-file), a tiny random Llama saved with save_pretrained, and every value checked
against the same model run in this process. HTTP goes through urllib (and TRL's own
VLLMClient for its route), never through kdkernels.teachers."""

from __future__ import annotations

import json
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="kdk serve-teacher needs the [serve] extra")
pytest.importorskip("uvicorn", reason="kdk serve-teacher needs the [serve] extra")
pytest.importorskip("transformers")

from safetensors.torch import load as load_safetensors  # noqa: E402

from kdkernels.cache.scoring import Head, topk_rows  # noqa: E402
from kdkernels.hf import models  # noqa: E402
from kdkernels.serve.launch import KdkLaunch, Server  # noqa: E402

KEY = "test-key"
MAX_LOGPROBS = 32
MAX_REQUEST_TOKENS = 600
MAX_NEW_TOKENS = 8
MAX_LEN = 64  # the model's max_position_embeddings
VOCAB = 300


# ---- the model and the server ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 heads of 32) with a 300-token byte-level BPE."""
    from kdkernels.train.config import ModelSize
    from kdkernels.train.sources.tiny_llama import build_llama
    from kdkernels.train.sources.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("teacher")
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    tok = train_bpe([text], VOCAB)
    torch.manual_seed(7)
    model = build_llama(ModelSize(64, 2, 2, 128), VOCAB, MAX_LEN, eos_id=tok.eos_token_id)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def ref(model_dir):
    """The served model, in this process, float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def smoke_launch(tmp_path_factory):
    """`--teacher default --preset smoke`, launched early (see server): it loads while the
    other server starts, which halves the module's start-up time."""
    launch = KdkLaunch("default", tmp_path_factory.mktemp("smoke") / "server.log", "--preset",
                       "smoke")
    yield launch
    Server(launch.proc, "", launch.log).stop()


@pytest.fixture(scope="module")
def server(smoke_launch, model_dir, tmp_path_factory):
    srv = KdkLaunch(str(model_dir), tmp_path_factory.mktemp("server") / "server.log",
                    "--api-key", KEY, "--max-logprobs", str(MAX_LOGPROBS),
                    "--max-batch-tokens", "256", "--max-request-tokens", str(MAX_REQUEST_TOKENS),
                    "--max-new-tokens", str(MAX_NEW_TOKENS)).ready()
    yield srv
    srv.stop()


def call(srv: Server, path: str, body=None, *, key: str | None = KEY,
         raw: bytes | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(srv.url + path, data, headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def ok_json(srv: Server, path: str, body=None) -> dict:
    status, data = call(srv, path, body)
    assert status == 200, data
    return json.loads(data)


def reference_logprobs(ref, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """The model's own float32 log_softmax(logits / T) at every position [L, V]."""
    model, _ = ref
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def rows(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g).tolist()


# ---- start-up, /health, /v1/models, auth ----------------------------------------------------
def test_announces_the_port_and_lists_the_model(server, model_dir):
    assert server.announced == f"kdk serve-teacher: serving {model_dir} on {server.url}"
    assert call(server, "/health", key=None) == (200, b"{}")
    body = ok_json(server, "/v1/models")
    assert body["object"] == "list"
    (m,) = body["data"]
    assert m == {"id": str(model_dir), "object": "model", "owned_by": "kdkernels",
                 "max_model_len": MAX_LEN, "vocab_size": VOCAB, "hidden_size": 64,
                 "max_logprobs": MAX_LOGPROBS}


@pytest.mark.parametrize("key", [None, "wrong"])
def test_v1_routes_need_the_api_key(server, key):
    for path, body in (("/v1/models", None), ("/v1/head", None),
                       ("/v1/completions", {"prompt": [1, 2], "max_tokens": 0})):
        status, data = call(server, path, body, key=key)
        assert status == 401, (path, data)
        err = json.loads(data)["error"]
        assert err["code"] == 401 and err["param"] == "Authorization"
        assert "--api-key" in err["message"]


# ---- /v1/completions: prompt log-probs as vLLM returns them ---------------------------------
def check_prompt_logprobs(entries: list, ids: list[int], want: torch.Tensor, k: int) -> int:
    """Entry i scores ids[i] from position i - 1; returns how many actual tokens were outside
    the top K (each then an extra entry with its true rank)."""
    assert entries[0] is None and len(entries) == len(ids)
    outside = 0
    for i in range(1, len(ids)):
        lp = want[i - 1]
        entry = entries[i]
        top = lp.topk(k)
        actual = ids[i]
        rank = int((lp >= lp[actual]).sum())
        assert next(iter(entry)) == str(actual), "vLLM puts the actual token first"
        assert entry[str(actual)]["rank"] == rank
        assert abs(entry[str(actual)]["logprob"] - float(lp[actual])) <= 1e-5
        by_rank = sorted(entry.items(), key=lambda kv: kv[1]["rank"])
        assert [int(t) for t, _ in by_rank[:k]] == top.indices.tolist()
        assert [v["rank"] for _, v in by_rank[:k]] == list(range(1, k + 1))
        for t, v in entry.items():
            assert abs(v["logprob"] - float(lp[int(t)])) <= 1e-5, (i, t)
            assert isinstance(v["decoded_token"], str)
        if rank > k:
            outside += 1
            assert len(entry) == k + 1
        else:
            assert len(entry) == k
    return outside


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_prompt_matches_the_models_log_softmax(server, ref, temperature):
    ids = rows(1, 24, seed=1)[0]
    k = 5
    body = ok_json(server, "/v1/completions", {
        "model": str(server_model_id(server)), "prompt": ids, "max_tokens": 1,
        "temperature": temperature, "prompt_logprobs": k, "logprobs": 3,
        "return_tokens_as_token_ids": True})
    assert body["object"] == "text_completion"
    (choice,) = body["choices"]
    want = reference_logprobs(ref, ids, temperature)
    assert check_prompt_logprobs(choice["prompt_logprobs"], ids, want, k) > 0
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 1
    # the generated token: its log-prob and the top 3 of the last position, keyed token_id:N
    block, last = choice["logprobs"], want[-1]
    token = choice["token_ids"][0]
    assert block["tokens"] == [f"token_id:{token}"]
    assert abs(block["token_logprobs"][0] - float(last[token])) <= 1e-5
    (top,) = block["top_logprobs"]
    for t in last.topk(3).indices.tolist():
        assert abs(top[f"token_id:{t}"] - float(last[t])) <= 1e-5
    assert body["usage"] == {"prompt_tokens": 24, "completion_tokens": 1, "total_tokens": 25}


def server_model_id(server: Server) -> str:
    return ok_json(server, "/v1/models")["data"][0]["id"]


def test_trl_list_of_prompts_one_choice_each(server, ref):
    """TRL's request: a list of id lists (unequal lengths: the server right-pads them in one
    forward), max_tokens 1, prompt_logprobs K; one choice per prompt, in order."""
    prompts = [rows(1, n, seed=n)[0] for n in (5, 17, 40, 9)]
    k = 8
    body = ok_json(server, "/v1/completions", {
        "prompt": prompts, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for ids, choice in zip(prompts, body["choices"], strict=True):
        check_prompt_logprobs(choice["prompt_logprobs"], ids, reference_logprobs(ref, ids), k)
        assert choice["logprobs"] is None and choice["finish_reason"] in ("length", "stop")


class UrllibSession:
    """The two calls VLLMClient makes on its requests.Session (get/post with json=),
    over urllib: requests is not installed here (TRL imports it only inside VLLMClient)."""

    class Reply:
        def __init__(self, status: int, data: bytes):
            self.status_code, self.text, self.headers = status, data.decode(), {}

        def json(self):
            return json.loads(self.text)

    def __init__(self, srv: Server):
        self.srv = srv

    def get(self, url: str, **_kw):
        return self.Reply(*call(self.srv, url.removeprefix(self.srv.url)))

    def post(self, url: str, json=None, **_kw):  # json=: the keyword requests takes
        return self.Reply(*call(self.srv, url.removeprefix(self.srv.url), json))


def test_trls_vllm_client_against_the_server(server, ref):
    """TRL 1.16's own VLLMClient.get_sequence_logprobs. Its __init__ refuses to run without
    vllm installed (is_vllm_available) and needs requests, so the client is made with
    __new__ and given what __init__ would set: a session (UrllibSession, requests' get/post
    over urllib), base_url and model (from /v1/models through TRL's own _get). Everything
    after that (the request, the rank sort, the padding) is TRL's code."""
    vllm_client = pytest.importorskip("trl.generation.vllm_client")

    client = vllm_client.VLLMClient.__new__(vllm_client.VLLMClient)
    client.session = UrllibSession(server)
    client.base_url = server.url
    client.model = client._get(f"{server.url}/v1/models")["data"][0]["id"]
    seqs = [rows(1, n, seed=10 + n)[0] for n in (12, 20, 7)]
    prompt_lengths = [4, 10, 2]
    k, t = 6, 0.7
    out = client.get_sequence_logprobs(seqs, prompt_lengths, top_logprobs=k, temperature=t,
                                       chunk_size=2, max_concurrent_requests=2)
    for b, (ids, p) in enumerate(zip(seqs, prompt_lengths, strict=True)):
        want = reference_logprobs(ref, ids, t)
        assert len(out["logprobs"][b]) == len(ids) - p
        for j, pos in enumerate(range(p, len(ids))):
            top = want[pos - 1].topk(k)
            assert out["logprob_token_ids"][b][j] == top.indices.tolist()
            assert max(abs(a - float(w)) for a, w in
                       zip(out["logprobs"][b][j], top.values, strict=True)) <= 1e-5
            assert out["actual_token_ids"][b][j] == [ids[pos]]
            assert abs(out["actual_logprobs"][b][j][0] - float(want[pos - 1][ids[pos]])) <= 1e-5


def test_text_prompt_is_tokenised_by_the_server(server, ref):
    _, tok = ref
    text = "def parse_args(self, args=None):"
    body = ok_json(server, "/v1/completions", {"prompt": [text], "max_tokens": 0,
                                               "prompt_logprobs": 2})
    (choice,) = body["choices"]
    ids = tok(text)["input_ids"]
    assert choice["prompt_token_ids"] == ids and choice["token_ids"] == []
    assert choice["text"] == "" and choice["finish_reason"] == "length"
    check_prompt_logprobs(choice["prompt_logprobs"], ids, reference_logprobs(ref, ids), 2)


def test_tokenize_route_is_vllms(server, ref):
    """/tokenize (vLLM's shape, no model forward: the clients' tokenizer probe) answers for a
    text longer than max_model_len, which /v1/completions would refuse."""
    _, tok = ref
    (m,) = ok_json(server, "/v1/models")["data"]
    text = "def parse_args(self, args=None): return ['é', '中文', '🙂'] " * 8
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > m["max_model_len"]
    body = ok_json(server, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert body["tokens"] == ids and body["count"] == len(ids)
    assert body["max_model_len"] == m["max_model_len"]
    status, data = call(server, "/tokenize", {"prompt": 3})
    assert status == 400 and json.loads(data)["error"]["param"] == "prompt"


# ---- generation ------------------------------------------------------------------------------
def test_greedy_generation_matches_the_model(server, ref):
    model, tok = ref
    prompt = rows(1, 10, seed=3)[0]
    body = ok_json(server, "/v1/completions", {
        "prompt": prompt, "max_tokens": MAX_NEW_TOKENS, "temperature": 0, "logprobs": 2,
        "ignore_eos": True, "return_tokens_as_token_ids": True})
    (choice,) = body["choices"]
    ids, want_lps = list(prompt), []
    for _ in range(MAX_NEW_TOKENS):  # greedy, the whole sequence re-run each step
        lp = reference_logprobs(ref, ids)[-1]
        want_lps.append(lp)
        ids.append(int(lp.argmax()))
    assert choice["token_ids"] == ids[len(prompt):]
    assert choice["finish_reason"] == "length"
    assert choice["text"] == tok.decode(choice["token_ids"])
    block = choice["logprobs"]
    assert block["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    for got, lp, t in zip(block["token_logprobs"], want_lps, choice["token_ids"], strict=True):
        assert abs(got - float(lp[t])) <= 1e-5  # the server decodes with a KV cache
    assert body["usage"]["completion_tokens"] == MAX_NEW_TOKENS


def test_seeded_sampling_is_reproducible_and_scored_at_the_temperature(server, ref):
    prompt = rows(1, 6, seed=4)[0]
    req = {"prompt": prompt, "max_tokens": 4, "temperature": 0.8, "top_p": 0.9, "seed": 123,
           "logprobs": 1, "ignore_eos": True, "return_tokens_as_token_ids": True}
    a = ok_json(server, "/v1/completions", req)["choices"][0]
    b = ok_json(server, "/v1/completions", req)["choices"][0]
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 4
    ids = prompt + a["token_ids"]
    want = reference_logprobs(ref, ids, 0.8)
    for j, t in enumerate(a["token_ids"]):
        assert abs(a["logprobs"]["token_logprobs"][j] - float(want[len(prompt) - 1 + j][t])) \
            <= 1e-5


# ---- /v1/topk, /v1/hidden, /v1/head ------------------------------------------------------
def test_topk_route_is_the_cache_convention(server, ref):
    model, _ = ref
    ids = rows(3, 20, seed=5)
    status, data = call(server, "/v1/topk", {"input_ids": ids, "top_k": 7})
    assert status == 200
    got = load_safetensors(data)
    assert got["ids"].dtype == torch.int32 and got["logprobs"].dtype == torch.float32
    assert got["ids"].shape == got["logprobs"].shape == (3, 20, 7)
    head = Head.of(model)
    with torch.no_grad():
        hidden = models.hidden_states(model, torch.tensor(ids))
    for b in range(3):
        want_ids, want_lps = topk_rows(head, hidden[b], 7)
        assert torch.equal(got["ids"][b], want_ids)
        assert torch.equal(got["logprobs"][b], want_lps)  # the same ops on the same rows
    # the temperature divides the logits, all L positions filled (the last one too)
    status, data = call(server, "/v1/topk", {"input_ids": ids, "top_k": 7,
                                             "temperature": 0.7})
    got = load_safetensors(data)
    for b in range(3):
        top = reference_logprobs(ref, ids[b], 0.7).topk(7)
        assert torch.equal(got["ids"][b], top.indices.to(torch.int32))
        torch.testing.assert_close(got["logprobs"][b], top.values, rtol=0, atol=1e-5)


def test_hidden_route_is_bit_exact_in_float32(server, ref):
    model, _ = ref
    ids = rows(2, 16, seed=6)
    with torch.no_grad():
        want = models.hidden_states(model, torch.tensor(ids))
    status, data = call(server, "/v1/hidden", {"input_ids": ids})
    assert status == 200
    got = load_safetensors(data)["hidden"]
    assert got.dtype == torch.float32 and got.shape == (2, 16, 64)
    assert torch.equal(got, want)
    status, data = call(server, "/v1/hidden", {"input_ids": ids, "dtype": "bfloat16"})
    assert torch.equal(load_safetensors(data)["hidden"], want.to(torch.bfloat16))


def test_head_route(server, ref, model_dir):
    from safetensors import safe_open

    model, _ = ref
    status, data = call(server, "/v1/head")
    assert status == 200
    tensors = load_safetensors(data)
    assert set(tensors) == {"weight"}
    assert torch.equal(tensors["weight"], model.lm_head.weight.detach())
    path = model_dir.parent / "head.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"logit_scale": "1.0", "final_logit_softcap": "none",
                                "model": str(model_dir)}


# ---- batching -------------------------------------------------------------------------------
def post_at_once(srv: Server, path: str, bodies: list[dict]) -> list[tuple[int, bytes]]:
    """One thread per body, released together by a barrier."""
    results: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def post(i: int) -> None:
        barrier.wait()
        results[i] = call(srv, path, bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_requests_are_batched_and_get_their_own_rows(server, ref):
    """Threads post at once: each gets exactly its own rows, and rows of different requests
    shared forwards (/v1/stats: more rows in one forward than any one request holds)."""
    def stats() -> dict:
        return ok_json(server, "/v1/stats")

    batched = False
    for attempt in range(3):
        before = stats()
        n = 12
        prompts = [rows(1, 8 + 2 * i, seed=100 * attempt + i)[0] for i in range(n)]
        results = post_at_once(server, "/v1/completions", [
            {"prompt": p, "max_tokens": 0, "prompt_logprobs": 3} for p in prompts])
        for ids, (status, data) in zip(prompts, results, strict=True):
            assert status == 200, data
            (choice,) = json.loads(data)["choices"]
            assert choice["prompt_token_ids"] == ids
            check_prompt_logprobs(choice["prompt_logprobs"], ids, reference_logprobs(ref, ids),
                                  3)
        after = stats()
        assert after["rows"] - before["rows"] == n
        if after["forwards"] - before["forwards"] < n:
            batched = True
            break
    assert batched, f"{n} concurrent one-row requests never shared a forward: {after}"


def test_batcher_merges_rows_up_to_the_token_budget():
    """The worker takes the oldest rows while rows x longest fits --max-batch-tokens; each
    request gets its own rows back."""
    from kdkernels.serve.batcher import Batcher

    gate, calls = threading.Event(), []

    def forward(rs: list[list[int]]) -> list[torch.Tensor]:
        calls.append([len(r) for r in rs])
        gate.wait(10)
        return [torch.tensor(r, dtype=torch.float32)[:, None] for r in rs]

    b = Batcher(forward, max_batch_tokens=12)
    try:
        first = b.submit_rows([[1, 2, 3]])
        while not calls:  # the worker holds the first row; the rest queue behind it
            time.sleep(0.01)
        second = b.submit_rows([[4, 5], [6, 7, 8, 9]])
        third = b.submit_rows([[10] * 5])
        gate.set()
        for futures, want in ((first, [[1, 2, 3]]), (second, [[4, 5], [6, 7, 8, 9]]),
                              (third, [[10] * 5])):
            assert [f.result(10)[:, 0].tolist() for f in futures] == want
    finally:
        b.close()
    assert calls == [[3], [2, 4], [5]]  # 2 rows x 4 = 8 fit 12; a third (x 5 = 15) does not
    assert b.stats.forwards == 3 and b.stats.max_rows == 2


# ---- refusals ---------------------------------------------------------------------------
ERRORS = [
    # (route, body (bytes: sent raw), status, param, words of the message)
    ("/v1/completions", b"{not json", 400, "body", "not valid JSON"),
    ("/v1/completions", [1, 2], 400, "body", "JSON object"),
    ("/v1/completions", {"max_tokens": 1}, 400, "prompt", "prompt is required"),
    ("/v1/completions", {"prompt": [1, VOCAB]}, 400, "prompt", f"0..{VOCAB - 1}"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, 400, "prompt", "prompt[1] is empty"),
    ("/v1/completions", {"prompt": [1, 2], "prompt_logprobs": MAX_LOGPROBS + 1}, 400,
     "prompt_logprobs", "--max-logprobs"),
    ("/v1/completions", {"prompt": [1, 2], "logprobs": MAX_LOGPROBS + 1}, 400, "logprobs",
     "--max-logprobs"),
    ("/v1/completions", {"prompt": [1, 2], "model": "other"}, 404, "model", "other"),
    ("/v1/completions", {"prompt": [1] * (MAX_LEN + 1)}, 400, "prompt", "max_model_len"),
    ("/v1/completions", {"prompt": [[1] * MAX_LEN] * 10}, 400, "prompt",
     "--max-request-tokens"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": MAX_NEW_TOKENS + 1}, 400,
     "max_tokens", "--max-new-tokens"),
    ("/v1/completions", {"prompt": [1] * MAX_LEN, "max_tokens": 2}, 400, "max_tokens",
     "max_model_len"),
    ("/v1/completions", {"prompt": [1, 2], "temperature": -1}, 400, "temperature", ">= 0"),
    ("/v1/completions", {"prompt": [1, 2], "top_p": 0}, 400, "top_p", "> 0"),
    ("/v1/completions", {"prompt": [1, 2], "n": 2}, 400, "n", "must be 1"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": "1"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": [1, 2], "stream": True}, 400, "stream", "stream"),
    ("/v1/topk", {"input_ids": [[1, 2]], "top_k": MAX_LOGPROBS + 1}, 400, "top_k",
     "--max-logprobs"),
    ("/v1/topk", {"input_ids": [[1, 2]], "top_k": 4, "temperature": 0}, 400, "temperature",
     "> 0"),
    ("/v1/topk", {"input_ids": [[1, 2]], "top_k": 4, "temperature": -0.5}, 400,
     "temperature", "> 0"),
    ("/v1/topk", {"input_ids": [[1, 2]]}, 400, "top_k", "top_k is required"),
    ("/v1/topk", {"input_ids": [[1, 2], [3]], "top_k": 4}, 400, "input_ids", "equally long"),
    ("/v1/topk", {"input_ids": [1, 2], "top_k": 4}, 400, "input_ids", "id lists"),
    ("/v1/topk", {"top_k": 4}, 400, "input_ids", "input_ids is required"),
    ("/v1/hidden", {"input_ids": [[1, -1]]}, 400, "input_ids", "input_ids[0][1]"),
    ("/v1/hidden", {"input_ids": [[1, 2]], "dtype": "float64"}, 400, "dtype", "bfloat16"),
]


@pytest.mark.parametrize("route,body,status,param,words", ERRORS,
                         ids=[f"{e[0]}-{e[3]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_requests_name_the_field(server, route, body, status, param, words):
    raw = body if isinstance(body, bytes) else None
    got, data = call(server, route, None if raw is not None else body, raw=raw)
    assert got == status, data
    err = json.loads(data)["error"]
    assert err["code"] == status and err["param"] == param
    assert err["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    assert words in err["message"], err["message"]
    assert call(server, "/health", key=None)[0] == 200  # and the server lives on


# ---- the CLI -------------------------------------------------------------------------------
def test_missing_serve_extra_names_it(monkeypatch, capsys):
    import importlib.util

    from kdkernels import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert cli.main(["serve-teacher", "--teacher", "x"]) == 2
    err = capsys.readouterr().err
    assert "fastapi" in err and "pip install 'kdkernels[serve]'" in err


def test_bad_teacher_directory_is_refused(tmp_path, capsys):
    from kdkernels import cli

    assert cli.main(["serve-teacher", "--teacher", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "kdk serve-teacher: error: --teacher" in err and "not a directory" in err


def test_default_smoke_teacher_is_served(smoke_launch):
    """--teacher default --preset smoke: the embedded smoke teacher (trained and cached under
    ~/.cache/kdkernels on first use: ~8 s cold here), served under the id 'default'. Its
    prompt log-probs are checked against its own /v1/hidden and /v1/head."""
    srv = smoke_launch.ready()
    (m,) = ok_json(srv, "/v1/models")["data"]
    assert m["id"] == "default" and srv.announced.startswith("kdk serve-teacher: serving "
                                                             "default on http://127.0.0.1:")
    ids = rows(1, m["max_model_len"], seed=8)[0]
    ids = [i % m["vocab_size"] for i in ids]
    body = ok_json(srv, "/v1/completions", {"prompt": ids, "max_tokens": 1,
                                            "prompt_logprobs": 4, "logprobs": 4})
    head = load_safetensors(call(srv, "/v1/head")[1])
    status, data = call(srv, "/v1/hidden", {"input_ids": [ids], "dtype": "float32"})
    hidden = load_safetensors(data)["hidden"][0]
    assert head["weight"].shape == (m["vocab_size"], m["hidden_size"])
    want = torch.log_softmax(hidden @ head["weight"].float().T, dim=-1)
    check_prompt_logprobs(body["choices"][0]["prompt_logprobs"], ids, want, 4)
    block = body["choices"][0]["logprobs"]
    token = body["choices"][0]["token_ids"][0]
    assert abs(block["token_logprobs"][0] - float(want[-1, token])) <= 1e-5
    # The client's tokenizer probe runs (no "tokenizes no probe text" warning) and passes
    # against the embedded tokenizer, and refuses another tokenizer naming both.
    import warnings

    from kdkernels.teachers import KDKTeacher
    from kdkernels.train.sources.cache_sources import default_teacher

    _, tok, _ = default_teacher("cpu", "smoke")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with KDKTeacher(srv.url, top_k=4, tokenizer=tok) as t:
            t.check()
    from tests._data_helpers import tokenizer as other_tokenizer

    with KDKTeacher(srv.url, top_k=4, tokenizer=other_tokenizer()) as t:
        with pytest.raises(ValueError, match="default"):
            t.check()
    # SIGTERM: uvicorn shuts down, then re-raises the signal it caught (exit -15)
    assert srv.stop() in (0, -15)
    assert "Traceback" not in srv.log.read_text()
