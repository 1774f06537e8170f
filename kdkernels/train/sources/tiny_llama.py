"""The small Llama-architecture models the embedded `kdk distill` run trains."""

from __future__ import annotations

from torch import nn

from ..config import ModelSize


def build_llama(size: ModelSize, vocab_size: int, max_positions: int, *,
                eos_id: int = 0) -> nn.Module:
    """A small Llama-architecture causal LM from a local config (tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=size.hidden,
                      intermediate_size=size.ffn, num_hidden_layers=size.layers,
                      num_attention_heads=size.heads, num_key_value_heads=size.heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=True,
                      bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return LlamaForCausalLM(cfg)
