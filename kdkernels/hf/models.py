"""Hugging Face causal LMs as the losses see them: final hidden states from the base
model (never the LM-head forward that builds full logits), the head weight, the softcap."""

from __future__ import annotations

import torch
from torch import nn

from . import logit_transform as transform


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack under the LM head (LlamaModel, Gemma2Model, ...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    if base is None:
        base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        raise ValueError(f"{type(model).__name__} has no base model under its LM head; the "
                         "trainer needs a Hugging Face *ForCausalLM model")
    return base


def head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM-head weight [V, D] and bias (tied embeddings share the weight)."""
    out = model.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    return out.weight, getattr(out, "bias", None)


def rows(weight: torch.Tensor) -> int:
    """A weight's first dimension, also while ZeRO-3 partitions it (its shape is then [0])."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """(scale, softcap) the model applies to its LM-head output (Cohere's logit_scale,
    Granite's logits_scaling, Gemma-2's final_logit_softcapping, ...); (1.0, None) for none."""
    return transform.logit_transform(model.config)


def hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states [B, L, D] from the base model."""
    return base_model(model)(input_ids=input_ids, use_cache=False).last_hidden_state


def hidden_states_masked(model: nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None) -> torch.Tensor:
    """hidden_states with an optional attention mask (padded batches)."""
    return base_model(model)(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=False).last_hidden_state


def max_positions(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_seq_len(model: nn.Module, seq_len: int, name: str) -> None:
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} is longer than the {name}'s "
                         f"max_position_embeddings={limit}; pass --seq-len {limit} or less")


def check_pair(student: nn.Module, teacher: nn.Module, student_tok=None, teacher_tok=None) -> None:
    """Logit distillation compares distributions over one vocabulary. The rule:

    - both tokenizers given: they must map every token to the same id;
    - then the tokenizer (either one) must fit both heads and the student's input
      embeddings: heads may be padded beyond it (Qwen2.5 7B/0.5B: 152,064 and 151,936 rows
      for 151,665 tokens), and the loss compares the first min(rows) logits;
    - no tokenizer at all: the heads must have equal rows, as nothing shows which rows of
      a larger head are real tokens.
    """
    vs, vt = rows(head(student)[0]), rows(head(teacher)[0])
    if student_tok is not None and teacher_tok is not None:
        a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
        if a != b:
            only = sorted(set(a.items()) ^ set(b.items()))[:3]
            raise ValueError("teacher and student tokenizers differ (e.g. token/id pairs "
                             f"{only}); logit distillation needs one shared vocabulary: use a "
                             "student built on the teacher's tokenizer")
    tok = teacher_tok if teacher_tok is not None else student_tok
    if tok is None:
        if vs != vt:
            raise ValueError(f"student vocab ({vs} head rows) and teacher vocab ({vt}) differ "
                             "and neither model has a tokenizer to show which ids they share; "
                             "save the tokenizer with the teacher or the student")
        return
    n = len(tok)
    whose = "teacher's" if teacher_tok is not None else "student's"
    short = [f"the {name} head has {rows} rows" for name, rows in
             (("student", vs), ("teacher", vt)) if rows < n]
    emb = student.get_input_embeddings()
    if emb is not None and rows(emb.weight) < n:
        short.append(f"the student's input embeddings have {rows(emb.weight)} rows")
    if short:
        raise ValueError(f"the {whose} tokenizer has {n} tokens but {' and '.join(short)}; "
                         f"every head needs at least {n} rows (padded vocabularies may be "
                         "larger, never smaller)")
