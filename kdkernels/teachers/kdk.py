"""A teacher served by ``kdk serve-teacher``: top-K in the cache convention, or the exact mode.

- ``POST /v1/topk`` ``{"input_ids", "top_k", "temperature": 1.0}`` -> safetensors bytes with
  ``ids`` int32 and ``logprobs`` float32 [B, L, K], every position filled (the server has the
  last position's logits, so nothing is shifted here).
- ``POST /v1/hidden`` ``{"input_ids", "dtype"}`` -> safetensors ``hidden`` [B, L, Dt]: the
  final-norm hidden states the LM head reads. With ``head()`` (``GET /v1/head``: ``weight``
  [V, Dt], optional ``bias`` [V], metadata ``logit_scale`` and ``final_logit_softcap``) the
  student side computes the teacher's exact full-vocabulary logits: 2 Dt bytes per token in
  bf16, against about 6 K for top-K ids and log-probs.

Bodies are safetensors, never pickle; one that does not load (truncated, corrupt) is retried
like a connection error, then raised as ``TeacherResponseError``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from .base import TeacherClient
from .errors import TeacherResponseError
from .validate import check_targets

HIDDEN_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
                "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def load_body(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of a safetensors body (raises on a corrupt one)."""
    tensors = load_safetensors(data)
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__") or {}
    return tensors, meta


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in HIDDEN_DTYPES:
        return HIDDEN_DTYPES[dtype]
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise ValueError(f"dtype must be None (the server's), float32, bfloat16 or float16, got "
                     f"{dtype!r}")


class KDKTeacher(TeacherClient):
    """Top-K targets, hidden states and the LM head from ``kdk serve-teacher``."""

    server = "kdk"
    probe_routes = ("tokenize", "completions")
    _head: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None  # GET /v1/head, once

    def _post_tensors(self, path: str, payload: Any) -> dict[str, torch.Tensor]:
        return self._transport.call("POST", path, payload, parse=load_body)[0]

    def _tensor(self, tensors: dict[str, torch.Tensor], name: str, url: str) -> torch.Tensor:
        if name not in tensors:
            raise TeacherResponseError(f"the teacher at {url} answered tensors "
                                       f"{sorted(tensors)}, without {name!r}")
        return tensors[name]

    def _score_rows(self, rows: np.ndarray, row_offset: int) -> tuple[np.ndarray, np.ndarray]:
        url = self._transport.url_of("/v1/topk")
        tensors = self._post_tensors("/v1/topk", {"input_ids": rows.tolist(),
                                                  "top_k": self.top_k, "temperature": 1.0})
        ids, lps = self._tensor(tensors, "ids", url), self._tensor(tensors, "logprobs", url)
        for name, t, want in (("ids", ids, torch.int32), ("logprobs", lps, torch.float32)):
            if t.dtype != want:
                raise TeacherResponseError(f"the teacher at {url} answered {name} of dtype "
                                           f"{t.dtype}, expected {want}")
        b, L = rows.shape
        check_targets(ids.numpy(), lps.numpy(), url=url, rows=b, length=L, k=self.top_k,
                      vocab_size=self.vocab_size, row_offset=row_offset,
                      field=lambda r, t: f"ids/logprobs[{r}, {t}]")
        return ids.numpy(), lps.numpy()

    def hidden_states(self, input_ids: Any, dtype: Any = None) -> torch.Tensor:
        """The teacher's final-norm hidden states [B, L, Dt] (the server's dtype unless
        ``dtype`` names float32, bfloat16 or float16)."""
        name = _dtype_name(dtype)
        x = self.as_rows(input_ids)
        self.check()
        B, L = x.shape
        url = self._transport.url_of("/v1/hidden")

        def one(s: int, e: int) -> torch.Tensor:
            h = self._tensor(self._post_tensors("/v1/hidden", {"input_ids": x[s:e].tolist(),
                                                               "dtype": name}), "hidden", url)
            where = f"the teacher at {url} answered hidden for rows {s}..{e - 1}"
            if h.ndim != 3 or tuple(h.shape[:2]) != (e - s, L):
                raise TeacherResponseError(f"{where} of shape {list(h.shape)}, expected "
                                           f"[{e - s}, {L}, Dt]")
            if name is not None and HIDDEN_DTYPES.get(h.dtype) != name:
                raise TeacherResponseError(f"{where} of dtype {h.dtype}, asked for {name}")
            if not h.is_floating_point() or not torch.isfinite(h).all():
                raise TeacherResponseError(f"{where} with non-finite values (field hidden)")
            return h

        ranges = self.split(B, L) if B else []
        parts = self.run(one, ranges)
        self._transport.count_tokens(B * L)
        if not parts:
            size = self._model_entry().get("hidden_size")
            return torch.empty(0, L, size if isinstance(size, int) else 0)
        dims = {p.shape[2] for p in parts}
        size = self._model_entry().get("hidden_size")
        if len(dims) != 1 or (isinstance(size, int) and dims != {size}):
            raise TeacherResponseError(f"the teacher at {url} answered hidden sizes "
                                       f"{sorted(dims)}; /v1/models says hidden_size {size}")
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _head_body(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        if self._head is None:
            url = self._transport.url_of("/v1/head")
            tensors, meta = self._transport.call("GET", "/v1/head", parse=load_body)
            w = self._tensor(tensors, "weight", url)
            bias = tensors.get("bias")
            vocab = self._model_entry().get("vocab_size")
            if w.ndim != 2 or (isinstance(vocab, int) and w.shape[0] != vocab):
                raise TeacherResponseError(f"the teacher at {url} answered weight of shape "
                                           f"{list(w.shape)}, expected [V, Dt] with V = "
                                           f"{vocab if isinstance(vocab, int) else 'vocab'}")
            if bias is not None and tuple(bias.shape) != (w.shape[0],):
                raise TeacherResponseError(f"the teacher at {url} answered bias of shape "
                                           f"{list(bias.shape)}, expected [{w.shape[0]}]")
            for key in ("logit_scale", "final_logit_softcap"):
                value = meta.get(key)
                try:
                    ok = value is not None and (key == "final_logit_softcap" and
                                                value.lower() == "none" or float(value) > 0)
                except ValueError:
                    ok = False
                if not ok:
                    raise TeacherResponseError(f"the teacher at {url} answered metadata "
                                               f"{key}={value!r}, expected a positive float"
                                               + (" or 'none'" if "softcap" in key else ""))
            self._head = (tensors, meta)
        return self._head

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's LM head: (weight [V, Dt], bias [V] or None), fetched once."""
        tensors, _ = self._head_body()
        return tensors["weight"], tensors.get("bias")

    def logit_transform(self) -> tuple[float, float | None]:
        """(logit_scale, final_logit_softcap or None) applied to the head's logits."""
        _, meta = self._head_body()
        cap = meta["final_logit_softcap"]
        return float(meta["logit_scale"]), None if cap.lower() == "none" else float(cap)
