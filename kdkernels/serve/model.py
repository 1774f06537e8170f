"""The served teacher: a Hugging Face causal LM (or the embedded `default` of a preset), its
tokenizer, its LM head as the cache sees it, and the forward passes the server runs."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..cache.scoring import Head
from ..hf import models
from ..train.sources import cache_sources

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ServedModel:
    name: str  # the --teacher argument as given: the id /v1/models reports
    model: nn.Module
    tokenizer: Any
    head: Head
    device: torch.device
    max_model_len: int
    _texts: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.head.vocab_size

    @property
    def hidden_size(self) -> int:
        return int(self.head.weight.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def eos_id(self) -> int | None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):  # some configs list several
            eos = eos[0] if eos else None
        return None if eos is None else int(eos)

    @torch.inference_mode()
    def hidden(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Final-norm hidden states of each row ([L_i, D], on the device) from ONE forward.
        Rows of unequal length are right-padded and masked: causal attention then never lets
        a real position see a pad, and Llama-style models number positions from the start
        whatever the mask, so the real positions' outputs do not depend on the padding."""
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        ids = ids.to(self.device)
        if bool(mask.all()):  # no padding: the same call as kdkernels.hf.models.hidden_states
            h = models.hidden_states(self.model, ids)
        else:
            h = models.hidden_states_masked(self.model, ids, mask.to(self.device))
        return [h[i, :len(r)] for i, r in enumerate(rows)]

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, Any]:
        """Hidden states [L, D] of one prompt and the KV cache that continues it."""
        out = models.base_model(self.model)(
            input_ids=torch.tensor([ids], dtype=torch.long, device=self.device), use_cache=True)
        return out.last_hidden_state[0], _cache_of(out)

    @torch.inference_mode()
    def decode(self, token: int, cache: Any) -> tuple[torch.Tensor, Any]:
        """Hidden state [D] of one more token after a prefill/decode, and the grown cache."""
        base = models.base_model(self.model)
        out = base(input_ids=torch.tensor([[token]], dtype=torch.long, device=self.device),
                   use_cache=True, **{_cache_keyword(base): cache})
        return out.last_hidden_state[0, -1], _cache_of(out)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("the served model has no tokenizer: send token ids, not text")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens,
                                   verbose=False)["input_ids"])

    def decode_ids(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids)

    def token_text(self, token: int) -> str:
        """The text of one token, as vLLM's ``decoded_token`` (memoised: log-prob responses
        name the same few thousand tokens over and over)."""
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.decode_ids([token])
        return text


def _cache_keyword(base: nn.Module) -> str:
    """transformers 5.x names the KV cache ``cache``; 4.x named it ``past_key_values``."""
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def load(teacher: str, *, preset: str = "default", device: str = "cpu",
         dtype: str = "fp32") -> ServedModel:
    """A local Hugging Face causal-LM directory, or ``default``: the embedded teacher of
    ``preset``, trained and cached under ~/.cache/kdkernels if it is not (as
    `kdk cache-teacher --teacher default` does)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but torch sees no CUDA device; pass --device cpu")
    dev = torch.device(device)
    if teacher == cache_sources.DEFAULT:
        model, tok, _ = cache_sources.default_teacher(dev, preset)
    else:
        model, tok = cache_sources.load_teacher(teacher, dev)
    model = model.to(DTYPES[dtype]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head = Head.of(model)
    limit = models.max_positions(model)
    return ServedModel(teacher, model, tok, head, dev,
                       int(limit) if limit is not None else 1 << 31)
