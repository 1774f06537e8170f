"""Seeded sampling with Hugging Face `generate` (KV cache, eval mode, no grad).

HF generate samples with the global torch RNG. Rather than re-implement its loop, every call
runs inside `torch.random.fork_rng` with the global generator seeded from a key (seed, step,
micro-batch, rank): the samples are a pure function of that key and of the model's weights,
and the trainer's own RNG stream (dropout, anything else) is left exactly as it was. A
resumed run therefore needs no sampler state: it re-derives the same seeds for the same
steps, like the data batches (windows.train_batch). This is the "fork/restore" option; its
cost is nothing, and it keeps every generate feature (caches of any model type, synced_gpus
for FSDP).
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from ..batches import completions


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn: --max-new-tokens, --gen-temperature, --gen-top-p."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


def key_seed(*key: object) -> int:
    """A 63-bit seed from a key: distinct keys give unrelated streams."""
    text = repr(key).encode()
    return (zlib.crc32(text) << 31) ^ zlib.crc32(text[::-1])


def _generation_config(sampling: Sampling, eos_id: int | None, pad_id: int):
    from transformers import GenerationConfig

    # Every logits processor a model's own generation_config could switch on is set to its
    # neutral value: generate fills unset fields from the model's config, and a checkpoint's
    # repetition penalty or top-k would otherwise change what "sampling at T, top-p" means.
    return GenerationConfig(
        do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
        min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
        no_repeat_ngram_size=0, num_beams=1, min_new_tokens=0,
        max_new_tokens=sampling.max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
        use_cache=True, bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None,
        forced_bos_token_id=None, forced_eos_token_id=None)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
           sampling: Sampling, *, seed: int, eos_id: int | None, pad_id: int,
           bf16: bool = False, synced: bool = False) -> torch.Tensor:
    """[B, N] sampled completions (N <= max_new_tokens: generate stops when every row has
    emitted EOS; rows that stopped earlier are padded, which completions.assemble masks).
    synced=True keeps every rank stepping until all have finished (FSDP's collectives)."""
    device = prompt_ids.device
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), _eval_mode(model), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        torch.manual_seed(seed)
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                             generation_config=_generation_config(sampling, eos_id, pad_id),
                             synced_gpus=synced)
    return out[:, prompt_ids.shape[1]:]


def generate_batch(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   sampling: Sampling, *, seed: int, eos_id: int | None, pad_id: int,
                   bf16: bool = False, synced: bool = False) -> dict[str, torch.Tensor]:
    """Sampled completions as a training batch (input_ids, attention_mask, labels)."""
    completion = sample(model, prompt_ids, prompt_mask, sampling, seed=seed, eos_id=eos_id,
                        pad_id=pad_id, bf16=bf16, synced=synced)
    return completions.assemble(prompt_ids, prompt_mask, completion, eos_id, pad_id)
