"""Log-probs, top-K, true ranks and sampling from final hidden states, a chunk of rows at a
time: the server never holds [tokens x vocab] logits beyond CHUNK_ROWS rows.

Temperature T divides the (scaled, softcapped) logits before the log-softmax; T = 1 runs the
same operations as kdkernels.cache.scoring (x / 1.0 is exact), so its values match the cache's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.scoring import CHUNK_ROWS, Head
from ..hf.logit_transform import apply_logit_transform


def log_probs(head: Head, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fp32 log_softmax(logits / T) of ``hidden`` rows [C, D] (one chunk)."""
    w = head.weight if hidden.dtype == head.weight.dtype else head.weight.to(hidden.dtype)
    logits = hidden @ w.T
    if head.bias is not None:
        logits = logits + head.bias.to(logits.dtype)
    logits = apply_logit_transform(logits.float(), head.scale, head.softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


@torch.inference_mode()
def topk_table(head: Head, hidden: torch.Tensor, k: int, temperature: float = 1.0,
               chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache convention: int32 ids and fp32 log-probs [N, k] on the CPU, most likely
    first; slots beyond the vocabulary, and ids of probability 0, are empty (-1, 0.0)."""
    n, k_eff = hidden.shape[0], min(k, head.vocab_size)
    ids = torch.full((n, k), -1, dtype=torch.int32)
    lps = torch.zeros((n, k), dtype=torch.float32)
    for s in range(0, n, chunk_rows):
        v, i = log_probs(head, hidden[s:s + chunk_rows], temperature).topk(k_eff, dim=-1)
        ids[s:s + chunk_rows, :k_eff] = i.to(torch.int32).cpu()
        lps[s:s + chunk_rows, :k_eff] = v.cpu()
    dead = torch.isneginf(lps)
    if bool(dead.any()):
        ids[dead], lps[dead] = -1, 0.0
    return ids, lps


@dataclass
class RowLogprobs:
    """Per row: its top-K (ids int64, fp32 log-probs) and one chosen token's log-prob and
    true rank (the number of ids whose log-prob is >= the token's: vLLM's rank, 1-based)."""

    top_ids: torch.Tensor  # [N, K]
    top_lps: torch.Tensor  # [N, K]
    token_lps: torch.Tensor  # [N]
    token_ranks: torch.Tensor  # [N] int64
    tokens: torch.Tensor  # [N] int64: the chosen tokens


@torch.inference_mode()
def rows_with_tokens(head: Head, hidden: torch.Tensor, tokens: torch.Tensor, k: int,
                     temperature: float = 1.0,
                     chunk_rows: int = CHUNK_ROWS) -> RowLogprobs:
    """Top-K of each row of ``hidden`` [N, D] and the log-prob and rank of ``tokens[n]``
    (vLLM's prompt_logprobs: row n scores the token that follows it)."""
    n, k_eff = hidden.shape[0], min(k, head.vocab_size)
    top_ids = torch.empty((n, k_eff), dtype=torch.int64)
    top_lps = torch.empty((n, k_eff), dtype=torch.float32)
    token_lps = torch.empty(n, dtype=torch.float32)
    ranks = torch.empty(n, dtype=torch.int64)
    tokens = tokens.to(hidden.device, torch.long)
    for s in range(0, n, chunk_rows):
        lp = log_probs(head, hidden[s:s + chunk_rows], temperature)
        tok = lp.gather(1, tokens[s:s + chunk_rows, None])
        v, i = lp.topk(k_eff, dim=-1)
        top_ids[s:s + chunk_rows], top_lps[s:s + chunk_rows] = i.cpu(), v.cpu()
        token_lps[s:s + chunk_rows] = tok[:, 0].cpu()
        ranks[s:s + chunk_rows] = (lp >= tok).sum(dim=-1).cpu()
    return RowLogprobs(top_ids, top_lps, token_lps, ranks, tokens.cpu())


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary


@torch.inference_mode()
def next_token(head: Head, hidden: torch.Tensor, sampling: Sampling, k: int,
               generator: torch.Generator) -> RowLogprobs:
    """Pick the token after one hidden row [D]: argmax at temperature 0, else a draw from
    softmax(logits / T) restricted by top_k and top_p. Returned log-probs (the token's and
    the top-K) are log_softmax(logits / T) before any top-k/top-p cut (T = 1 when greedy)."""
    t = sampling.temperature if sampling.temperature > 0 else 1.0
    lp = log_probs(head, hidden[None], t)[0]
    if sampling.temperature <= 0:
        token = int(lp.argmax())
    else:
        probs = _restricted(lp, sampling).exp()  # not in place: lp is returned
        token = int(torch.multinomial(probs, 1, generator=generator))
    v, i = lp.topk(min(k, head.vocab_size))
    rank = (lp >= lp[token]).sum()
    return RowLogprobs(i[None].cpu(), v[None].cpu(), lp[token].reshape(1).cpu(),
                       rank.reshape(1).cpu(), torch.tensor([token]))


def _restricted(lp: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Log-probs with the ids outside top_k / the top_p nucleus set to -inf."""
    out = lp
    if 0 < sampling.top_k < lp.numel():
        kth = lp.topk(sampling.top_k).values[-1]
        out = out.masked_fill(out < kth, float("-inf"))
    if sampling.top_p < 1.0:
        v, i = out.sort(descending=True)
        before = v.exp().cumsum(0) - v.exp()  # mass of the ids ranked above each one
        drop = torch.zeros_like(out, dtype=torch.bool)
        drop[i] = before >= sampling.top_p  # keeps the smallest set reaching top_p
        out = out.masked_fill(drop, float("-inf"))
    return out
