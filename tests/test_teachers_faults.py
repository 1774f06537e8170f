"""The served-teacher clients against a real HTTP server on loopback, scripted to fail: each
fault ends in a retry that succeeds, a clear error or a refusal, never a wrong target."""

from __future__ import annotations

import socket
import time
import warnings

import numpy as np
import pytest
import torch

from kdkernels.teachers import (
    KDKTeacher,
    SGLangTeacher,
    TeacherRequestError,
    TeacherResponseError,
    TeacherStats,
    TeacherUnavailable,
    VLLMTeacher,
    make_teacher,
)
from tests._teacher_server import MODEL_ID, CharTokenizer, Reply, ScriptedServer

V, K = 13, 3
PROMPTS = np.array([[1, 4, 6, 2, 9], [2, 2, 5, 12, 0]])


@pytest.fixture
def server():
    s = ScriptedServer(vocab=V)
    yield s
    s.close()


def vllm(server, **kw) -> VLLMTeacher:
    kw = {"timeout": 5.0, "retries": 2, "backoff": 0.01, "vocab_size": V, **kw}
    return VLLMTeacher(server.url, K, **kw)


def assert_expected(server, got, prompts=PROMPTS, k=K):
    ids, lps = server.expected(prompts, k)
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.float32
    np.testing.assert_array_equal(got[0].numpy(), ids)
    np.testing.assert_array_equal(got[1].numpy(), lps)


def test_vllm_scores_the_table(server):
    with vllm(server) as t:
        assert_expected(server, t.score(torch.from_numpy(PROMPTS)))
        assert t.model_id == MODEL_ID and t.stats.retries == 0 and t.stats.tokens == 10
        assert t.stats.bytes_received > 0 and t.stats.seconds > 0
    body = [s for s in server.seen if s.path == "/v1/completions"][0].body
    assert body["prompt"] == PROMPTS.tolist() and body["model"] == MODEL_ID
    assert (body["prompt_logprobs"], body["logprobs"], body["max_tokens"]) == (K, K, 1)
    assert body["temperature"] == 1.0 and body["return_tokens_as_token_ids"] is True


def test_a_500_then_an_answer_is_retried(server):
    server.on("/v1/completions", lambda req, n: Reply(500, {"error": "boom"}) if n == 0 else None)
    with vllm(server) as t:
        assert_expected(server, t.score(PROMPTS))
        assert t.stats.retries == 1
    assert server.count("/v1/completions") == 2


def test_always_500_is_unavailable_after_the_retries(server):
    server.on("/v1/completions", lambda req, n: Reply(500, {"error": {"message": "down"}}))
    with vllm(server, retries=2) as t, pytest.raises(TeacherUnavailable) as err:
        t.score(PROMPTS)
    msg = str(err.value)
    assert f"{server.url}/v1/completions" in msg and "HTTP 500" in msg and "3 attempt" in msg
    assert server.count("/v1/completions") == 3


def test_a_slow_server_times_out(server):
    server.on("/v1/completions", lambda req, n: Reply(delay=3.0))
    start = time.monotonic()
    with vllm(server, timeout=0.3, retries=1) as t, pytest.raises(TeacherUnavailable) as err:
        t.score(PROMPTS)
    assert "timed out" in str(err.value) and "timeout 0.3 s" in str(err.value)
    assert time.monotonic() - start < 2.0
    assert server.count("/v1/completions") == 2


def test_a_refused_connection_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = VLLMTeacher(f"http://127.0.0.1:{port}", K, timeout=2.0, retries=2, backoff=0.01)
    with pytest.raises(TeacherUnavailable) as err:
        t.score(PROMPTS)
    assert f"127.0.0.1:{port}/v1/models" in str(err.value)
    assert "ConnectionRefused" in str(err.value) and "3 attempt" in str(err.value)
    assert t.stats.retries == 2


def test_a_server_that_dies_mid_run_is_unavailable():
    server = ScriptedServer(vocab=V)
    t = vllm(server)
    assert_expected(server, t.score(PROMPTS))
    server.close()
    with pytest.raises(TeacherUnavailable, match="ConnectionRefused"):
        t.score(PROMPTS)
    t.close()


def test_a_malformed_body_is_retried_then_refused(server):
    server.on("/v1/completions", lambda req, n: Reply(body=b'{"choices": [{"index": 0,'))
    with vllm(server) as t, pytest.raises(TeacherResponseError) as err:
        t.score(PROMPTS)
    assert "malformed body" in str(err.value) and "/v1/completions" in str(err.value)
    assert server.count("/v1/completions") == 3


def test_a_truncated_body_is_retried(server):
    good = server.completion({"prompt": PROMPTS.tolist(), "prompt_logprobs": K})
    server.on("/v1/completions", lambda req, n: Reply(body=good, truncate=60) if n < 2 else None)
    with vllm(server) as t:
        assert_expected(server, t.score(PROMPTS))
        assert t.stats.retries == 2
    server.on("/v1/completions", lambda req, n: Reply(body=good, truncate=60))
    with vllm(server) as t, pytest.raises(TeacherResponseError) as err:
        t.score(PROMPTS)
    assert "truncated body (60 of" in str(err.value)


def _mutated(server, mutate):
    def fn(req, n):
        body = server.completion(req.body)
        mutate(body["choices"][1]["prompt_logprobs"][3], body)
        return Reply(body=body)
    return fn


def _first(entry):
    return next(key for key, v in entry.items() if v["rank"] == 1)


def _out_of_range(entry, body):
    entry[str(V + 3)] = entry.pop(_first(entry))


def _duplicate(entry, body):
    second = next(key for key, v in entry.items() if v["rank"] == 2)
    entry["0" + _first(entry)] = entry.pop(second)  # "07" is id 7 again


def _positive(entry, body):
    entry[_first(entry)]["logprob"] = 0.5


def _mass(entry, body):
    for v, lp in zip(entry.values(), (-0.1, -0.2, -0.3, -0.4), strict=False):
        v["logprob"] = lp


def _shape(entry, body):
    body["choices"][1]["prompt_logprobs"].pop()


@pytest.mark.parametrize("mutate, words", [
    (_out_of_range, ["out of range [0, 13)", "field ids"]),
    (_duplicate, ["appears more than once"]),
    (_positive, ["log-prob 0.5 > 0"]),
    (_mass, ["sum to", "> 1 + 0.001"]),
    (_shape, ["prompt_logprobs has 4 entries", "expected one per prompt token (5)"]),
])
def test_a_bad_answer_is_a_clear_error(server, mutate, words):
    server.on("/v1/completions", _mutated(server, mutate))
    with vllm(server) as t, pytest.raises(TeacherResponseError) as err:
        t.score(PROMPTS)
    msg = str(err.value)
    assert "row 1" in msg and f"{server.url}/v1/completions" in msg, msg
    if mutate is not _shape:
        assert "position 2" in msg and "choices[1].prompt_logprobs[3]" in msg, msg
    for w in words:
        assert w in msg, msg
    assert server.count("/v1/completions") == 1  # a bad target is not asked for again


def test_k_over_the_servers_limit_is_refused(server):
    message = "Requested prompt logprobs of 3, which is greater than max allowed: 2"
    server.on("/v1/completions", lambda req, n: Reply(400, {"error": {
        "message": message, "type": "BadRequestError", "param": "prompt_logprobs",
        "code": 400}}))
    with vllm(server) as t, pytest.raises(ValueError, match="--max-logprobs 3") as err:
        t.score(PROMPTS)
    assert "top_k=3" in str(err.value) and message in str(err.value)
    assert server.count("/v1/completions") == 1


def test_k_over_a_reported_limit_is_refused_before_scoring(server):
    server.models_extra["max_logprobs"] = 2
    with KDKTeacher(server.url, K, backoff=0.01) as t, pytest.raises(ValueError,
                                                                      match="--max-logprobs"):
        t.score(PROMPTS)
    assert server.count("/v1/topk") == 0


def test_other_4xx_are_not_retried(server):
    server.on("/v1/completions", lambda req, n: Reply(401, {"error": {"message": "bad key"}}))
    with vllm(server, api_key="sekrit") as t, pytest.raises(TeacherRequestError) as err:
        t.score(PROMPTS)
    assert err.value.status == 401 and "bad key" in str(err.value)
    assert server.count("/v1/completions") == 1
    assert all(s.headers.get("Authorization") == "Bearer sekrit" for s in server.seen)


def test_the_tokenizer_probe(server):
    server.tokenizer = CharTokenizer(V)
    with vllm(server, tokenizer=CharTokenizer(V)) as t:  # /tokenize agrees
        assert_expected(server, t.score(PROMPTS))
    assert server.count("/tokenize") == 1
    with vllm(server, tokenizer=CharTokenizer(V, "local-tok", shift=1)) as t, \
            pytest.raises(ValueError, match="tokenizer mismatch") as err:
        t.score(PROMPTS)
    assert MODEL_ID in str(err.value) and "local-tok" in str(err.value)
    # without /tokenize, the ids of a text prompt (prompt_token_ids) are compared
    server.on("/tokenize", lambda req, n: Reply(404, {"detail": "Not Found"}))
    with vllm(server, tokenizer=CharTokenizer(V)) as t:
        assert_expected(server, t.score(PROMPTS))
    with vllm(server, tokenizer=CharTokenizer(V, "local-tok", shift=2)) as t, \
            pytest.raises(ValueError, match="local-tok"):
        t.score(PROMPTS)


def test_the_probe_fits_a_short_context(server):
    """Without /tokenize, the completions probe is cut to the served max_model_len: a server
    that refuses longer prompts (as kdk serve-teacher and vLLM do) is still checked."""
    server.tokenizer = CharTokenizer(V)
    server.models_extra = {"max_model_len": 12}
    server.on("/tokenize", lambda req, n: Reply(404, {"detail": "Not Found"}))

    def short_only(req, n):
        if isinstance(req.body.get("prompt"), str) and len(req.body["prompt"]) + 1 > 12:
            return Reply(400, {"error": {"message": "prompt too long", "code": 400}})
        return None  # the default answer

    server.on("/v1/completions", short_only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "tokenizes no probe text" would be a failure here
        with vllm(server, tokenizer=CharTokenizer(V)) as t:
            assert_expected(server, t.score(PROMPTS))
    with vllm(server, tokenizer=CharTokenizer(V, "local-tok", shift=1)) as t, \
            pytest.raises(ValueError, match="tokenizer mismatch"):
        t.score(PROMPTS)


def test_a_batch_is_split_by_the_token_budget_and_put_back_in_order(server):
    rng = np.random.default_rng(1)
    prompts = rng.integers(0, V, (7, 5))
    server.delay = 0.05  # let the requests overlap
    with vllm(server, max_tokens_per_request=10, concurrency=3) as t:
        assert_expected(server, t.score(prompts), prompts)
        assert t.stats.requests == 1 + 4  # /v1/models and four requests
    sent = [s.body["prompt"] for s in server.seen if s.path == "/v1/completions"]
    assert len(sent) == 4 and all(len(p) * 5 <= 10 for p in sent)
    assert sorted(map(tuple, (r for p in sent for r in p))) == sorted(map(tuple, prompts))
    assert server.max_in_flight >= 2


def test_requests_are_bounded_and_inputs_checked(server):
    with vllm(server, max_tokens_per_request=4) as t:
        with pytest.raises(ValueError, match="max_tokens_per_request=4"):
            t.score(PROMPTS)
        with pytest.raises(ValueError, match=r"input_ids\[0, 1\] = -3"):
            t.score([[1, -3]])
        with pytest.raises(ValueError, match=r"\[0, 13\)"):
            t.score([[1, 13]])
        with pytest.raises(ValueError, match="integer token ids"):
            t.score(torch.zeros(1, 2))
        with pytest.raises(ValueError, match=r"\[B, L\]"):
            t.score(torch.zeros(3, dtype=torch.long))
    for bad in (dict(top_k=0), dict(retries=-1), dict(timeout=0), dict(concurrency=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            VLLMTeacher(server.url, **{"top_k": K, **bad})
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        VLLMTeacher("localhost:8000")
    with pytest.raises(ValueError, match="server must be one of"):
        make_teacher("tgi", server.url)


def test_model_keyword_must_be_served(server):
    with vllm(server, model="other") as t, pytest.raises(ValueError, match="not served"):
        t.score(PROMPTS)


def test_sglang_over_http(server):
    for flat in (True, False):
        with SGLangTeacher(server.url, K, backoff=0.01, vocab_size=V, flat=flat) as t:
            assert_expected(server, t.score(PROMPTS))
    bodies = [s.body for s in server.seen if s.path == "/generate"]
    assert bodies[0]["return_flat_raw_top_logprobs_b64"] is True
    assert "return_flat_raw_top_logprobs" not in bodies[1]


def test_kdk_topk_hidden_and_head(server):
    server.models_extra.update(vocab_size=V, hidden_size=server.hidden_size, max_logprobs=8)
    with make_teacher("kdk", server.url, top_k=K, backoff=0.01,
                      max_tokens_per_request=5, concurrency=2) as t:
        assert isinstance(t, KDKTeacher) and t.vocab_size == V
        assert_expected(server, t.score(PROMPTS))
        h = t.hidden_states(PROMPTS)
        assert h.dtype == torch.float32 and torch.equal(h, server.embed[torch.from_numpy(PROMPTS)])
        assert t.hidden_states(PROMPTS, dtype=torch.bfloat16).dtype == torch.bfloat16
        w, b = t.head()
        assert torch.equal(w, server.head_weight) and b is None
        assert t.logit_transform() == (0.5, None)
        assert isinstance(t.stats, TeacherStats) and t.stats.tokens == 30
    assert server.count("/v1/head") == 1 and server.count("/v1/hidden") == 4


def test_kdk_corrupt_and_truncated_bodies(server):
    server.models_extra.update(vocab_size=V)
    good = {}

    def flaky(req, n):
        if n == 0:
            return Reply(body=b"\x08\x00\x00\x00\x00\x00\x00\x00{not js",
                         content_type="application/octet-stream")
        return None

    server.on("/v1/topk", flaky)
    with KDKTeacher(server.url, K, backoff=0.01) as t:
        assert_expected(server, t.score(PROMPTS))
        assert t.stats.retries == 1

    def truncated(req, n):
        good.setdefault("r", server.answer(req))
        return Reply(body=good["r"].body[:-7], content_type="application/octet-stream")

    server.on("/v1/topk", truncated)
    with KDKTeacher(server.url, K, backoff=0.01, retries=1) as t, \
            pytest.raises(TeacherResponseError, match="malformed body"):
        t.score(PROMPTS)

    def out_of_range(req, n):
        ids, lps = server.expected(np.array(req.body["input_ids"]), K)
        ids[0, 3, 1] = V
        return server.tensors({"ids": torch.from_numpy(ids), "logprobs": torch.from_numpy(lps)})

    server.on("/v1/topk", out_of_range)
    with KDKTeacher(server.url, K, backoff=0.01) as t, \
            pytest.raises(TeacherResponseError, match=r"row 0, position 3: ids/logprobs"):
        t.score(PROMPTS)
