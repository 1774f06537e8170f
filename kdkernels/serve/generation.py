"""Generation of one prompt as a task of the batcher's worker: a prefill, then one decode step
per call, with the KV cache kept between steps."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import torch

from . import scoring
from .model import ServedModel


def generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The request's seed (the same seed draws the same tokens), else a fresh random one."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63) if seed is None else seed)
    return g


@dataclass
class Generated:
    prompt_hidden: torch.Tensor  # [L, D]: the prompt's final hidden states
    tokens: list[int] = field(default_factory=list)
    steps: list[scoring.RowLogprobs] = field(default_factory=list)
    finish_reason: str = "length"


@dataclass
class Generation:
    """``step()`` runs the prefill, then a decode per call; ``result`` when done."""

    served: ServedModel
    prompt: list[int]
    max_tokens: int
    sampling: scoring.Sampling
    k: int  # top-K log-probs kept per generated token
    gen: torch.Generator
    stop: int | None  # EOS, None with ignore_eos
    result: Generated | None = None
    _cache: Any = None
    _last: torch.Tensor | None = None

    def step(self) -> bool:
        if self.result is None:
            hidden, self._cache = self.served.prefill(self.prompt)
            self.result = Generated(hidden)
            self._last = hidden[-1]
        else:
            self._last, self._cache = self.served.decode(self.result.tokens[-1], self._cache)
        return self._pick()

    def _pick(self) -> bool:
        res = self.result
        row = scoring.next_token(self.served.head, self._last, self.sampling, self.k, self.gen)
        token = pick_token(row)
        res.tokens.append(token)
        res.steps.append(row)
        if self.stop is not None and token == self.stop:
            res.finish_reason = "stop"
            return True
        if len(res.tokens) >= self.max_tokens:
            self._cache = None  # free the KV cache now
            return True
        return False


def pick_token(row: scoring.RowLogprobs) -> int:
    """The token a RowLogprobs from scoring.next_token was made for."""
    return int(row.tokens[0])
