"""A teacher's answers rendered by hand in each server's documented format, from a log-softmax
table, and the expected targets computed from the same table with plain numpy (no code shared
with kdkernels.teachers).

table [B, L, V] float64: table[b, t] is the teacher's distribution of the token after
prompt[b, t] (-inf allowed: vLLM sends -9999, SGLang null or -inf).
"""

from __future__ import annotations

import base64

import numpy as np


def log_softmax_table(rng: np.random.Generator, B: int, L: int, V: int,
                      masked: float = 0.0) -> np.ndarray:
    """A random [B, L, V] log-softmax table; ``masked`` is the share of -inf logits (one
    logit of each row always stays finite)."""
    logits = rng.normal(size=(B, L, V)) * 3.0
    if masked:
        off = rng.random((B, L, V)) < masked
        off[..., rng.integers(V)] = False
        logits = np.where(off, -np.inf, logits)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def expected_targets(table: np.ndarray, k: int,
                     last: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The top-k ids/log-probs of every position, -inf slots empty (id -1, 0.0), packed
    first; ``last=False`` leaves position L - 1 empty (no generated token)."""
    B, L, V = table.shape
    ids = np.full((B, L, k), -1, np.int32)
    lps = np.zeros((B, L, k), np.float32)
    for b in range(B):
        for t in range(L if last else L - 1):
            order = np.argsort(-table[b, t], kind="stable")[:k]
            order = [i for i in order if np.isfinite(table[b, t, i])]
            ids[b, t, :len(order)] = order
            lps[b, t, :len(order)] = table[b, t, order].astype(np.float32)
    return ids, lps


def _top(row: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-row, kind="stable")[:k]]


def _vllm_value(v: float) -> float:
    return -9999.0 if v == -np.inf else float(v)


def vllm_prompt_entry(row: np.ndarray, actual: int, k: int) -> dict:
    """vLLM's prompt_logprobs entry: the actual token first (with its true rank), then the
    top k by rank; -inf clamped to -9999."""
    top = _top(row, k)
    entry = {}
    if actual not in top:
        rank = int((row > row[actual]).sum()) + 1
        entry[str(actual)] = {"logprob": _vllm_value(row[actual]), "rank": rank,
                              "decoded_token": f"<{actual}>"}
    for r, i in enumerate(top):
        entry[str(i)] = {"logprob": _vllm_value(row[i]), "rank": r + 1,
                         "decoded_token": f"<{i}>"}
    if actual in top:  # vLLM lists the actual token first
        entry = {str(actual): entry[str(actual)],
                 **{key: v for key, v in entry.items() if key != str(actual)}}
    return entry


def vllm_choice(table_b: np.ndarray, prompt: list[int], k: int, index: int,
                sampled: int | None) -> dict:
    """One /v1/completions choice for a prompt; ``sampled`` None sends no logprobs block."""
    L = len(prompt)
    plp = [None] + [vllm_prompt_entry(table_b[t], prompt[t + 1], k) for t in range(L - 1)]
    choice = {"index": index, "text": "", "finish_reason": "length", "stop_reason": None,
              "prompt_logprobs": plp, "prompt_token_ids": list(prompt), "logprobs": None}
    if sampled is not None:
        row = table_b[L - 1]
        top = {f"token_id:{sampled}": _vllm_value(row[sampled])}
        top.update({f"token_id:{i}": _vllm_value(row[i]) for i in _top(row, k)})
        choice["logprobs"] = {"text_offset": [0], "token_logprobs": [_vllm_value(row[sampled])],
                              "tokens": [f"token_id:{sampled}"], "top_logprobs": [top]}
        choice["token_ids"] = [sampled]
    return choice


def vllm_completion(table: np.ndarray, prompts: np.ndarray, k: int,
                    sampled: list[int | None] | None = None) -> dict:
    B = len(prompts)
    sampled = sampled if sampled is not None else [0] * B
    return {"id": "cmpl-test", "object": "text_completion", "created": 0, "model": "m",
            "choices": [vllm_choice(table[b], prompts[b].tolist(), k, b, sampled[b])
                        for b in range(B)],
            "usage": {"prompt_tokens": int(prompts.size), "completion_tokens": B}}


def _triples(row: np.ndarray, k: int) -> list:
    # orjson writes -inf as null
    return [[None if row[i] == -np.inf else float(row[i]), i, None] for i in _top(row, k)]


def sglang_nested(table: np.ndarray, prompts: np.ndarray, k: int) -> list[dict]:
    B, L = prompts.shape
    return [{"text": "", "meta_info": {
        "id": f"r{b}", "prompt_tokens": L, "completion_tokens": 1,
        "input_top_logprobs": [None] + [_triples(table[b, t], k) for t in range(L - 1)],
        "output_top_logprobs": [_triples(table[b, L - 1], k)]}} for b in range(B)]


def sglang_flat(table: np.ndarray, prompts: np.ndarray, k: int, *, b64: bool = True,
                shape_counts_prefix: bool = False) -> list[dict]:
    """The flat input format (PR #32078/#31960); ``shape_counts_prefix`` renders the earlier
    revision whose shape[0] counted the null prefix."""
    B, L = prompts.shape
    V = table.shape[-1]
    kk = min(k, V)
    out = []
    for b in range(B):
        tops = [_top(table[b, t], kk) for t in range(L - 1)]
        vals = np.array([[table[b, t, i] for i in top] for t, top in enumerate(tops)],
                        np.float32).reshape(L - 1, kk)
        idx = np.array(tops, np.int32).reshape(L - 1, kk)
        meta = {"id": f"r{b}", "prompt_tokens": L, "completion_tokens": 1,
                "input_top_logprobs_shape": [L if shape_counts_prefix else L - 1, kk],
                "input_top_logprobs_null_prefix": 1,
                "output_top_logprobs": [_triples(table[b, L - 1], k)]}
        if b64:
            meta.update({
                "input_top_logprobs_val_flat_b64": base64.b64encode(vals.tobytes()).decode(),
                "input_top_logprobs_idx_flat_b64": base64.b64encode(idx.tobytes()).decode(),
                "input_top_logprobs_val_flat_b64_dtype": "float32",
                "input_top_logprobs_idx_flat_b64_dtype": "int32"})
        else:
            meta.update({
                "input_top_logprobs_val_flat": [None if v == -np.inf else float(v)
                                                for v in vals.reshape(-1)],
                "input_top_logprobs_idx_flat": [int(i) for i in idx.reshape(-1)]})
        out.append({"text": "", "meta_info": meta})
    return out
