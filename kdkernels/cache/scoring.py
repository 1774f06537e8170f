"""Sparse teacher targets from a causal LM, a chunk of rows at a time (never [L, V] logits).

Position t of a sequence gets the teacher's distribution of the token after input_ids[t]
(a causal LM's logits[:, t]): its top-K ids with log-probs, or the distinct ids of a seeded
multinomial sample with log(count / samples).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..hf import models
from ..hf.logit_transform import apply_logit_transform

CHUNK_ROWS = 256


@dataclass(frozen=True)
class Head:
    """The LM head as the cache sees it: weight [V, D], optional bias, final softcap and the
    model's logit scale (Cohere, Granite, ...: applied before the softcap)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    scale: float = 1.0

    @classmethod
    def of(cls, model: torch.nn.Module) -> Head:
        weight, bias = models.head(model)
        scale, softcap = models.logit_transform(model)
        return cls(weight.detach(), None if bias is None else bias.detach(), softcap, scale)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 log-softmax of the logits of ``hidden`` rows [C, D] (one chunk)."""
        w = self.weight if hidden.dtype == self.weight.dtype else self.weight.to(hidden.dtype)
        logits = hidden @ w.T
        if self.bias is not None:
            logits = logits + self.bias.to(logits.dtype)
        logits = apply_logit_transform(logits.float(), self.scale, self.softcap)
        return torch.log_softmax(logits, dim=-1)


def topk_rows(head: Head, hidden: torch.Tensor, k: int,
              chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids (int32) and fp32 log-probs of every row of ``hidden`` [N, D]."""
    k_eff = min(k, head.vocab_size)
    ids = torch.full((hidden.shape[0], k), -1, dtype=torch.int32)
    lps = torch.zeros((hidden.shape[0], k), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk_rows):
        v, i = head.log_probs(hidden[s:s + chunk_rows]).topk(k_eff, dim=-1)
        ids[s:s + chunk_rows, :k_eff] = i.to(torch.int32).cpu()
        lps[s:s + chunk_rows, :k_eff] = v.cpu()
    return ids, lps


def sequence_generator(seed: int, sequence: int, device: torch.device) -> torch.Generator:
    """The generator of one sequence: a function of (seed, sequence index) only, so that a
    resumed run draws exactly what an uninterrupted one drew."""
    g = torch.Generator(device=device)
    g.manual_seed(zlib.crc32(f"kdkernels-cache:{seed}:{sequence}".encode()))
    return g


def sample_rows(head: Head, hidden: torch.Tensor, k: int, samples: int,
                generator: torch.Generator,
                chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` draws per row from the teacher's softmax; the distinct ids (most frequent
    first, ties by smaller id) with log(count / samples). Fewer distinct ids than k leave
    empty slots (id -1, log-prob 0); more keep the k most frequent."""
    n, V = hidden.shape[0], head.vocab_size
    ids = torch.full((n, k), -1, dtype=torch.int32)
    lps = torch.zeros((n, k), dtype=torch.float32)
    k_eff = min(k, V)
    for s in range(0, n, chunk_rows):
        probs = head.log_probs(hidden[s:s + chunk_rows]).exp_()
        draws = torch.multinomial(probs, samples, replacement=True, generator=generator)
        counts = torch.zeros_like(probs, dtype=torch.int64).scatter_add_(
            1, draws, torch.ones_like(draws))
        # a unique key per id, larger for more draws then smaller ids: topk is then exact
        key = counts * V + (V - 1 - torch.arange(V, device=counts.device))
        top = key.topk(k_eff, dim=-1).indices
        c = counts.gather(1, top)
        got = c > 0
        i = torch.where(got, top, -1).to(torch.int32)
        lp = torch.where(got, torch.log(c.double() / samples), 0.0).float()
        ids[s:s + chunk_rows, :k_eff] = i.cpu()
        lps[s:s + chunk_rows, :k_eff] = lp.cpu()
    return ids, lps


@torch.no_grad()
def score(model: torch.nn.Module, head: Head, input_ids: torch.Tensor, *, mode: str, k: int,
          samples: int, seed: int, first_index: int,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher targets for a batch [B, L] of sequences numbered first_index...; returns
    int32 ids and fp32 log-probs [B, L, K] on the CPU."""
    hidden = models.hidden_states(model, input_ids.to(device))  # [B, L, D], final norm applied
    B, L = input_ids.shape
    ids = torch.empty((B, L, k), dtype=torch.int32)
    lps = torch.empty((B, L, k), dtype=torch.float32)
    for b in range(B):
        if mode == "topk":
            ids[b], lps[b] = topk_rows(head, hidden[b], k)
        else:
            g = sequence_generator(seed, first_index + b, hidden.device)
            ids[b], lps[b] = sample_rows(head, hidden[b], k, samples, g)
    return ids, lps
