"""Served teachers: top-K targets (and, from ``kdk serve-teacher``, hidden states and the LM
head) from a teacher in an inference server, over HTTP with the standard library.

``score(input_ids [B, L])`` returns ``(ids int32 [B, L, K], logprobs float32 [B, L, K])`` in
the convention of ``kdk cache-teacher`` (position t: the teacher's T = 1 distribution of the
token after t; id -1 with log-prob 0 is an empty slot), so the online and offline paths feed
the same loss.
"""

from __future__ import annotations

from typing import Any

from .base import TeacherClient
from .errors import TeacherError, TeacherRequestError, TeacherResponseError, TeacherUnavailable
from .kdk import KDKTeacher
from .sglang import SGLangTeacher
from .transport import TeacherStats
from .vllm import VLLMTeacher

SERVERS: dict[str, type[TeacherClient]] = {"vllm": VLLMTeacher, "sglang": SGLangTeacher,
                                           "kdk": KDKTeacher}


def make_teacher(server: str, url: str, **kwargs: Any) -> TeacherClient:
    """The client of a ``server`` ("vllm", "sglang" or "kdk") at ``url``; ``kwargs`` are the
    clients' keywords (top_k, timeout, retries, model, api_key, tokenizer, ...)."""
    if server not in SERVERS:
        raise ValueError(f"server must be one of {sorted(SERVERS)}, got {server!r}")
    return SERVERS[server](url, **kwargs)


__all__ = ["KDKTeacher", "SERVERS", "SGLangTeacher", "TeacherClient", "TeacherError",
           "TeacherRequestError", "TeacherResponseError", "TeacherStats", "TeacherUnavailable",
           "VLLMTeacher", "make_teacher"]
