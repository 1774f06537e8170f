"""The vLLM and SGLang answer parsers: recorded answers in each documented format
(tests/data/teachers/) against targets written by hand, and random log-softmax tables rendered
in each format against their numpy top-k. SGLang has no CPU build here, so its adapter is
tested on these formats only."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdkernels.teachers import TeacherResponseError
from kdkernels.teachers.sglang import generate_request, parse_generate
from kdkernels.teachers.validate import check_targets
from kdkernels.teachers.vllm import completion_request, parse_completions
from tests import _teacher_formats as fmt

DATA = Path(__file__).parent / "data" / "teachers"
PROMPTS = np.array([[1, 4, 6], [2, 2, 5]])
# What the recorded answers say, read by hand: position t = entry t + 1 (the null entry 0 has
# no position), position 2 = the generated token's top-2. Row 0 position 1 drops the actual
# token 6 (rank 5); row 1 position 0 has a -inf (vLLM -9999, SGLang null / -inf) and position
# 1 drops the actual token 5 (rank 3); row 1's generated block drops the sampled token 0.
EXPECTED_IDS = np.array([[[4, 3], [0, 7], [2, 5]],
                         [[2, -1], [3, 4], [3, 6]]], np.int32)
EXPECTED_LPS = np.array([[[-0.5, -1.25], [-0.25, -2.0], [-0.75, -1.0]],
                         [[-0.125, 0.0], [-0.5, -1.5], [-0.0625, -3.5]]], np.float32)


def load(name: str):
    return json.loads((DATA / name).read_text())


def assert_targets(got, ids, lps, vocab=None):
    g_ids, g_lps, field = got
    np.testing.assert_array_equal(g_ids, ids)
    np.testing.assert_array_equal(g_lps, lps)
    assert g_ids.dtype == np.int32 and g_lps.dtype == np.float32
    B, L, K = ids.shape
    check_targets(g_ids, g_lps, url="u", rows=B, length=L, k=K, vocab_size=vocab, field=field)


def test_vllm_recorded_answer():
    assert_targets(parse_completions(load("vllm_completions.json"), PROMPTS, 2),
                   EXPECTED_IDS, EXPECTED_LPS, vocab=8)


@pytest.mark.parametrize("name", ["sglang_nested.json", "sglang_flat_b64.json"])
def test_sglang_recorded_answers(name):
    assert_targets(parse_generate(load(name), PROMPTS, 2), EXPECTED_IDS, EXPECTED_LPS, vocab=8)


def test_vllm_and_sglang_requests():
    rows = np.array([[3, 1, 2]])
    body = completion_request(rows, 7, "m")
    assert body == {"model": "m", "prompt": [[3, 1, 2]], "max_tokens": 1, "temperature": 1.0,
                    "n": 1, "prompt_logprobs": 7, "logprobs": 7,
                    "return_tokens_as_token_ids": True}
    body = generate_request(rows, 7, flat=False)
    assert body["input_ids"] == [[3, 1, 2]] and body["top_logprobs_num"] == 7
    assert body["sampling_params"] == {"max_new_tokens": 1, "temperature": 1.0}
    assert body["return_logprob"] is True and body["logprob_start_len"] == 0
    assert "return_flat_raw_top_logprobs" not in body
    flat = generate_request(rows, 7, flat=True)
    assert flat["return_flat_raw_top_logprobs"] and flat["return_flat_raw_top_logprobs_b64"]


def test_vllm_without_generated_block_leaves_the_last_position_empty():
    body = load("vllm_completions.json")
    for c in body["choices"]:
        c["logprobs"] = None
    ids, lps, _ = parse_completions(body, PROMPTS, 2)
    np.testing.assert_array_equal(ids[:, :2], EXPECTED_IDS[:, :2])
    assert (ids[:, 2] == -1).all() and (lps[:, 2] == 0).all()


def test_smaller_k_keeps_the_best_ranks():
    ids, lps, _ = parse_completions(load("vllm_completions.json"), PROMPTS, 1)
    np.testing.assert_array_equal(ids[..., 0], EXPECTED_IDS[..., 0])
    s_ids, _, _ = parse_generate(load("sglang_flat_b64.json"), PROMPTS, 1)
    np.testing.assert_array_equal(s_ids[..., 0], EXPECTED_IDS[..., 0])


def test_sglang_single_result_as_an_object():
    one = load("sglang_nested.json")[0]
    ids, _, _ = parse_generate(one, PROMPTS[:1], 2)
    np.testing.assert_array_equal(ids, EXPECTED_IDS[:1])


def _bad(mutate, parser=parse_completions, name="vllm_completions.json"):
    body = load(name)
    mutate(body)
    with pytest.raises(TeacherResponseError) as err:
        parser(body, PROMPTS, 2, url="http://x")
    return str(err.value)


def test_vllm_malformed_answers_name_the_field():
    def string_keys(b):
        b["choices"][1]["prompt_logprobs"][1] = {"d": {"logprob": -0.5, "rank": 1}}
    assert "decoded strings" in _bad(string_keys)

    def decoded_generated(b):
        b["choices"][0]["logprobs"]["top_logprobs"][0] = {"3": -0.1}
    assert "token_id:" in _bad(decoded_generated)

    def short(b):
        b["choices"][0]["prompt_logprobs"].pop()
    msg = _bad(short)
    assert "prompt_logprobs" in msg and "row 1" in msg  # choices[0] is index 1: row 1

    def reordered(b):
        b["choices"][0]["prompt_token_ids"] = [9, 9, 9]
    assert "prompt_token_ids" in _bad(reordered)

    def missing(b):
        b["choices"].pop()
    assert "choices" in _bad(missing)


def test_sglang_malformed_answers_name_the_field():
    def short(b):
        b[1]["meta_info"]["input_top_logprobs"].pop()
    assert "input_top_logprobs" in _bad(short, parse_generate, "sglang_nested.json")

    def shape(b):
        b[0]["meta_info"]["input_top_logprobs_shape"] = [3, 3]
    assert "input_top_logprobs_shape" in _bad(shape, parse_generate, "sglang_flat_b64.json")

    def not_b64(b):
        b[0]["meta_info"]["input_top_logprobs_val_flat_b64"] = "###"
    assert "base64" in _bad(not_b64, parse_generate, "sglang_flat_b64.json")

    def bad_triple(b):
        b[0]["meta_info"]["input_top_logprobs"][1][0] = [-0.5, "four", None]
    assert "token id" in _bad(bad_triple, parse_generate, "sglang_nested.json")


def test_sglang_flat_falls_back_to_nested_per_result():
    flat = load("sglang_flat_b64.json")
    mixed = [flat[0], copy.deepcopy(load("sglang_nested.json")[1])]
    assert_targets(parse_generate(mixed, PROMPTS, 2), EXPECTED_IDS, EXPECTED_LPS)


# ---- random tables rendered in each format ------------------------------------------------
@st.composite
def cases(draw):
    k = draw(st.sampled_from([1, 2, 3, 5, 7, 11, 13]))
    return dict(B=draw(st.integers(1, 3)), L=draw(st.integers(1, 6)), k=k,
                V=draw(st.integers(max(2, k - 3), k + 9)),
                masked=draw(st.sampled_from([0.0, 0.0, 0.3, 0.8])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _table(c):
    rng = np.random.default_rng(c["seed"])
    table = fmt.log_softmax_table(rng, c["B"], c["L"], c["V"], c["masked"])
    prompts = rng.integers(0, c["V"], (c["B"], c["L"]))
    return rng, table, prompts


def _roundtrip(obj):
    # a strict JSON round trip: nothing the formats render may need NaN/Infinity
    return json.loads(json.dumps(obj, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(cases(), st.booleans())
def test_vllm_format_of_random_tables(c, generated):
    rng, table, prompts = _table(c)
    sampled = [int(rng.integers(c["V"])) if generated else None for _ in range(c["B"])]
    body = _roundtrip(fmt.vllm_completion(table, prompts, c["k"], sampled))
    body["choices"].reverse()  # the parser orders choices by index
    ids, lps = fmt.expected_targets(table, c["k"], last=generated)
    assert_targets(parse_completions(body, prompts, c["k"]), ids, lps, vocab=c["V"])


@settings(max_examples=60, deadline=None)
@given(cases(), st.sampled_from(["nested", "flat_b64", "flat_lists", "flat_b64_old_shape"]))
def test_sglang_formats_of_random_tables(c, form):
    _, table, prompts = _table(c)
    if form == "nested":
        body = fmt.sglang_nested(table, prompts, c["k"])
    else:
        body = fmt.sglang_flat(table, prompts, c["k"], b64=form != "flat_lists",
                               shape_counts_prefix=form.endswith("old_shape"))
    ids, lps = fmt.expected_targets(table, c["k"])
    assert_targets(parse_generate(_roundtrip(body), prompts, c["k"]), ids, lps, vocab=c["V"])
