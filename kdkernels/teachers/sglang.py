"""A teacher served by SGLang's native ``POST /generate``.

Read from sgl-project/sglang (main, commit 001067fffe33; after PRs #32078 "flat response
format for prompt top logprobs" and #31960 "base64 encoding for the flat arrays", July 2026):
``python/sglang/srt/managers/tokenizer_manager.py`` (``add_logprob_to_meta_info``,
``detokenize_top_logprobs_tokens``, ``_build_flat_input_top_logprobs_fields``), the scheduler's
``add_input_logprob_return_values`` (``scheduler_output_processor_mixin.py``),
``io_struct.py`` (``GenerateReqInput``) and ``test/.../test_flat_raw_top_logprobs.py``.

Request: ``input_ids`` (list of id lists), ``sampling_params: {"max_new_tokens": 1,
"temperature": 1.0}``, ``return_logprob: true``, ``top_logprobs_num: K``,
``logprob_start_len: 0``; with ``flat=True`` also ``return_flat_raw_top_logprobs`` and
``return_flat_raw_top_logprobs_b64`` (a server older than the flat format ignores the two
unknown fields and answers nested, which is parsed as well). The answer is a list, one result
per prompt, each with a ``meta_info``:

- nested: ``input_top_logprobs`` has one entry per prompt token; entry i is None for i = 0
  (the scheduler "always pads the first one with None") and otherwise the top K of log
  p(token i | tokens < i) as ``[logprob, token_id, text-or-null]`` triples, most likely first
  (an empty list is sent as None too). The last prompt position's distribution is the
  sampling position: it comes back as ``output_top_logprobs[0]`` (same triples).
- flat (base64): ``input_top_logprobs_val_flat_b64`` / ``input_top_logprobs_idx_flat_b64``,
  contiguous little-endian arrays of dtype ``input_top_logprobs_{val,idx}_flat_b64_dtype``
  ("float32" / "int32"); the JSON-list variant is ``input_top_logprobs_{val,idx}_flat``.
  ``input_top_logprobs_null_prefix`` counts the leading null rows (1 here) that the arrays
  omit; ``input_top_logprobs_shape`` is [rows, k] of the arrays themselves (an earlier
  revision of the same PR counted the null prefix in rows; both are accepted: the row count
  is taken from the array length). Row r is entry ``null_prefix + r``. The flat format replaces
  only the input side: ``output_top_logprobs`` stays nested, and a request whose rows cannot be
  flattened falls back to nested.

The shift is vLLM's: entry t + 1 (row t + 1 - null_prefix of the flat arrays) fills position t,
``output_top_logprobs[0]`` fills position L - 1, so position t holds the distribution of the
token after t (axolotl's SGLang path pads the null row instead, one position off its vLLM path).
-inf log-probs come back as null (orjson) or -Infinity/-inf: empty slots.

The tokenizer probe uses SGLang's ``POST /tokenize`` (``{"model", "prompt",
"add_special_tokens"}`` -> ``{"tokens", "count", "max_model_len"}``); without it, the ids of
a text prompt from ``/generate``'s ``input_token_logprobs`` (``[logprob, id, text]``).
SGLang has no CPU build here: this adapter is tested on recorded answers in these formats.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np

from .base import TeacherClient
from .errors import TeacherRequestError, TeacherResponseError
from .slots import empty_targets, fill, fill_rows, logprob, token_id
from .validate import FieldOf, check_targets

_DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "int32": "<i4",
           "int64": "<i8"}


def generate_request(rows: np.ndarray, k: int, flat: bool) -> dict[str, Any]:
    """The /generate body that scores ``rows`` [b, L] with top-``k`` log-probs."""
    body: dict[str, Any] = {
        "input_ids": rows.tolist(),
        "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
        "return_logprob": True, "top_logprobs_num": k, "logprob_start_len": 0,
        "return_text_in_logprobs": False,
    }
    if flat:
        body["return_flat_raw_top_logprobs"] = True
        body["return_flat_raw_top_logprobs_b64"] = True
    return body


def _triples(entry: Any, where: str) -> list[tuple[int, float | None]]:
    """``[[logprob, token_id, text], ...]`` as (id, log-prob), most likely first."""
    if not isinstance(entry, list):
        raise TeacherResponseError(f"{where}: expected a list of [logprob, token_id, text], "
                                   f"got {str(entry)[:100]}")
    pairs = []
    for j, triple in enumerate(entry):
        if not isinstance(triple, list | tuple) or len(triple) < 2:
            raise TeacherResponseError(f"{where}[{j}]: expected [logprob, token_id, text], got "
                                       f"{str(triple)[:100]}")
        pairs.append((token_id(triple[1], f"{where}[{j}][1]"),
                      logprob(triple[0], f"{where}[{j}][0]")))
    pairs.sort(key=lambda p: (math.inf if p[1] is None else -p[1], p[0]))
    return pairs


def _flat_array(meta: dict[str, Any], name: str, where: str) -> np.ndarray:
    """``input_top_logprobs_<name>_flat_b64`` or ``..._flat`` as a 1-D array."""
    b64 = meta.get(f"input_top_logprobs_{name}_flat_b64")
    if b64 is not None:
        dtype = meta.get(f"input_top_logprobs_{name}_flat_b64_dtype",
                         "float32" if name == "val" else "int32")
        if dtype not in _DTYPES:
            raise TeacherResponseError(f"{where}.input_top_logprobs_{name}_flat_b64_dtype: "
                                       f"{dtype!r} is not one of {sorted(_DTYPES)}")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, TypeError, ValueError) as e:
            raise TeacherResponseError(f"{where}.input_top_logprobs_{name}_flat_b64 is not "
                                       f"base64: {e}") from None
        width = np.dtype(_DTYPES[dtype]).itemsize
        if len(raw) % width:
            raise TeacherResponseError(f"{where}.input_top_logprobs_{name}_flat_b64 holds "
                                       f"{len(raw)} bytes, not a whole number of {dtype}")
        return np.frombuffer(raw, dtype=_DTYPES[dtype])
    values = meta.get(f"input_top_logprobs_{name}_flat")
    if not isinstance(values, list):
        raise TeacherResponseError(f"{where}: input_top_logprobs_{name}_flat(_b64) missing")
    try:
        # null is orjson's -inf (an empty slot), as in the nested triples
        return np.asarray([-math.inf if v is None else v for v in values],
                          dtype=np.float64 if name == "val" else np.int64)
    except (TypeError, ValueError, OverflowError):
        raise TeacherResponseError(f"{where}.input_top_logprobs_{name}_flat holds a "
                                   f"non-number") from None


def _flat_rows(meta: dict[str, Any], L: int, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(values [rows, k], ids [rows, k], first entry index) of the flat input format."""
    vals, idx = _flat_array(meta, "val", where), _flat_array(meta, "idx", where)
    shape = meta.get("input_top_logprobs_shape")
    prefix = meta.get("input_top_logprobs_null_prefix", 0)
    if not (isinstance(shape, list) and len(shape) == 2 and all(
            isinstance(s, int) and s >= 0 for s in shape)) or not isinstance(prefix, int) \
            or prefix < 0:
        raise TeacherResponseError(f"{where}: input_top_logprobs_shape {shape!r} / "
                                   f"input_top_logprobs_null_prefix {prefix!r} are not "
                                   f"[rows, k] / an integer >= 0")
    kk = shape[1]
    rows = vals.size // kk if kk else 0
    if vals.size != idx.size or (kk and vals.size % kk) or shape[0] not in (rows,
                                                                          rows + prefix):
        raise TeacherResponseError(f"{where}: the flat arrays hold {vals.size} values and "
                                   f"{idx.size} ids, which do not fit input_top_logprobs_shape "
                                   f"{shape} with null_prefix {prefix}")
    if prefix + rows != L:
        raise TeacherResponseError(f"{where}: input_top_logprobs covers {prefix} null + {rows} "
                                   f"rows, expected one per prompt token ({L}); send "
                                   f"logprob_start_len: 0")
    if idx.size and (idx.min() < -2**31 or idx.max() >= 2**31):
        raise TeacherResponseError(f"{where}: input_top_logprobs_idx_flat holds an id outside "
                                   f"int32")
    return vals.reshape(rows, kk), idx.reshape(rows, kk).astype(np.int64), prefix


def _fill_flat(ids: np.ndarray, lps: np.ndarray, vals: np.ndarray, idx: np.ndarray,
               prefix: int, k: int) -> None:
    """Entry i = prefix + r of the flat rows fills position i - 1 (entry 0 has none)."""
    skip = max(0, 1 - prefix)  # a row of entry 0 (no null prefix) precedes position 0
    vals, idx = vals[skip:], idx[skip:]
    first = prefix + skip - 1
    fill_rows(ids[first:first + vals.shape[0]], lps[first:first + vals.shape[0]], idx, vals, k)


def parse_generate(body: Any, rows: np.ndarray, k: int, *, url: str = "",
                   row_offset: int = 0) -> tuple[np.ndarray, np.ndarray, FieldOf]:
    """(ids int32 [b, L, K], logprobs float32 [b, L, K], field namer) of a /generate answer
    to ``rows`` [b, L], nested or flat; unvalidated (``check_targets`` does that)."""
    b, L = rows.shape
    head = f"the teacher at {url}" if url else "the teacher"
    results = [body] if isinstance(body, dict) and b == 1 else body
    if not isinstance(results, list) or len(results) != b or \
            not all(isinstance(r, dict) and isinstance(r.get("meta_info"), dict)
                    for r in results):
        n = len(results) if isinstance(results, list) else "no"
        raise TeacherResponseError(f"{head}: the answer to rows {row_offset}..{row_offset + b - 1}"
                                   f" has {n} results with a meta_info, expected {b}")
    ids, lps = empty_targets(b, L, k)
    flat_rows: set[int] = set()
    for r, result in enumerate(results):
        meta = result["meta_info"]
        where = f"{head}, row {row_offset + r}: [{r}].meta_info"
        n_prompt = meta.get("prompt_tokens")
        if isinstance(n_prompt, int) and n_prompt != L:
            raise TeacherResponseError(f"{where}.prompt_tokens is {n_prompt}, expected {L}")
        if any(key.startswith("input_top_logprobs_val_flat") for key in meta):
            flat_rows.add(r)
            vals, idx, prefix = _flat_rows(meta, L, where)
            _fill_flat(ids[r], lps[r], vals, idx, prefix, k)
        else:
            top = meta.get("input_top_logprobs")
            if not isinstance(top, list) or len(top) != L:
                n = len(top) if isinstance(top, list) else top
                raise TeacherResponseError(
                    f"{where}.input_top_logprobs has {str(n)[:50]} entries, expected one per "
                    f"prompt token ({L}); send return_logprob, top_logprobs_num and "
                    f"logprob_start_len: 0")
            for t in range(L - 1):
                if top[t + 1]:
                    fill(ids[r, t], lps[r, t],
                         _triples(top[t + 1], f"{where}.input_top_logprobs[{t + 1}]"), k)
        out = meta.get("output_top_logprobs")
        if out is not None and not isinstance(out, list):
            raise TeacherResponseError(f"{where}.output_top_logprobs: expected a list, got "
                                       f"{str(out)[:100]}")
        if out and out[0]:
            fill(ids[r, L - 1], lps[r, L - 1],
                 _triples(out[0], f"{where}.output_top_logprobs[0]"), k)

    def field(r: int, t: int) -> str:
        if t == L - 1:
            return f"[{r}].meta_info.output_top_logprobs[0]"
        if r in flat_rows:
            return f"[{r}].meta_info.input_top_logprobs_val/idx_flat row of entry {t + 1}"
        return f"[{r}].meta_info.input_top_logprobs[{t + 1}]"

    return ids, lps, field


class SGLangTeacher(TeacherClient):
    """Top-K targets from SGLang's /generate (``flat=True`` asks for the base64 arrays,
    about 3.5x smaller than the nested triples; the answer is parsed in whichever format
    comes back)."""

    server = "sglang"
    probe_routes = ("tokenize", "generate")

    def __init__(self, url: str, top_k: int = 64, timeout: float = 60.0, retries: int = 3, *,
                 flat: bool = True, **kwargs: Any) -> None:
        super().__init__(url, top_k, timeout, retries, **kwargs)
        self.flat = bool(flat)

    def _fetch_model_entry(self) -> dict[str, Any]:
        try:
            return super()._fetch_model_entry()
        except TeacherRequestError as e:
            if e.status not in (404, 405):
                raise
        # An SGLang without the OpenAI routes still names its model here.
        info = self.get_json("/get_model_info")
        path = info.get("model_path") if isinstance(info, dict) else None
        if not isinstance(path, str):
            raise TeacherResponseError(f"{self.url}/get_model_info: no model_path in "
                                       f"{str(info)[:200]}")
        return {"id": self._model or path}

    def _route_tokens(self, route: str, text: str) -> list[int] | None:
        body = self.post_json("/generate", {
            "text": text, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
            "return_logprob": True, "logprob_start_len": 0})
        meta = body.get("meta_info") if isinstance(body, dict) else None
        triples = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
        if not isinstance(triples, list):
            return None
        return [t[1] if isinstance(t, list) and len(t) > 1 else t for t in triples]

    def _score_rows(self, rows: np.ndarray, row_offset: int) -> tuple[np.ndarray, np.ndarray]:
        body = self.post_json("/generate", generate_request(rows, self.top_k, self.flat))
        url = self._transport.url_of("/generate")
        ids, lps, field = parse_generate(body, rows, self.top_k, url=url,
                                         row_offset=row_offset)
        check_targets(ids, lps, url=url, rows=rows.shape[0], length=rows.shape[1],
                      k=self.top_k, vocab_size=self.vocab_size, row_offset=row_offset,
                      field=field)
        return ids, lps
