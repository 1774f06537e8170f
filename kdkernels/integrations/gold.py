"""FusedGOLDTrainer: TRL's GOLDTrainer whose ULD loss is kdkernels' fused one, from hidden states.

    from trl.experimental.gold import GOLDConfig
    from kdkernels.integrations.gold import FusedGOLDTrainer

    trainer = FusedGOLDTrainer(model=student, teacher_model=teacher,
                               args=GOLDConfig(use_uld_loss=True, uld_use_hybrid_loss=True, ...),
                               train_dataset=ds, processing_class=student_tokenizer)
    trainer.train()

Everything GOLD does stays TRL's (datasets, collators, on-policy generation, vLLM, the teacher's
inputs rebuilt from text, logging, the JSD path when ``use_uld_loss=False``). Only the ULD loss
changes, to ``kdkernels.fused_linear_uld_loss`` with the same options (``uld_*`` fields of
GOLDConfig, ``beta``), read from TRL's own ``ULDLoss`` object.

**Why it is done this way (TRL 1.16, trl/experimental/gold/gold_trainer.py).** No GOLDTrainer
method smaller than ``compute_loss`` (lines 2450-2580) sees the models' outputs: that one method
builds the teacher's inputs from text (``build_teacher_inputs_from_texts``, line 2484), runs the
full forwards ``model(input_ids=..., attention_mask=..., use_cache=False)`` (2495) and
``self.teacher_model(...)`` (2504), whose ``.logits`` are the [B, L, V] logits, and passes
``outputs_student.logits`` / ``outputs_teacher.logits`` to ``self.uld_loss_fn(...)`` (2548).
There is no ``_get_last_hidden_state`` / ``_compute_loss`` hook as in DistillationTrainer.
Overriding ``compute_loss`` with the hidden states would mean copying its ULD branch (~70 lines:
the teacher-input build, VLM teacher inputs, the forwards, the matched/unmatched logging).
Instead, ``compute_loss`` here wraps TRL's (it copies none of it): for the duration of the call
each model's LM-head module forwards its input unchanged (an instance-level ``forward`` on the
``get_output_embeddings()`` module; its parameters, hooks and state dict stay as they are), so
the ``.logits`` TRL passes on are the final hidden states and no [B, L, V] tensor is built; and
``self.uld_loss_fn`` is a ``FusedULDLossFn`` (ULDLoss's call signature) that applies the heads
itself, fused. Outside ``compute_loss`` (generation, evaluation of other metrics, saving) the
heads are untouched.

Where the heads cannot be skipped that way the loss still is ours, on the materialised logits
(``kdkernels.uld_loss``, same semantics, vectorised instead of TRL's per-sample loop):

- a model that caps its logits (``final_logit_softcapping``, Gemma-2), or scales them (Cohere,
  Granite, ...) after a biased head: ``scale * (h W + b)`` is not the head applied to the
  scaled hidden states. (Without a bias it is: the model applies its scale to what the
  passed-through head returns, so the fused loss sees ``scale * h`` and makes the same logits.)
- ``compute_loss(..., return_outputs=True)``: the outputs returned carry real logits.

Differences from GOLDTrainer's ULD path: no ``matched_loss`` / ``unmatched_loss`` logs for the
hybrid (the fused loss returns the total only; GOLD skips them when the loss object has no
``last_matched_loss``); under mixed-precision autocast the head GEMM runs in the fused loss, in
the weights' dtype, not under autocast.

Engines: tested in one process (CPU). Written for DDP too (the patched student head adds
``weight[:0].sum()``, a zero, so DDP's unused-parameter search finds the head; a [V, D] zero
gradient is the cost) and DeepSpeed ZeRO-1/2 (replicated heads), untested here. Refused:
ZeRO-3 and FSDP, whose LM head is sharded outside the student's forward:
GOLDTrainer calls the ULD loss after it, so the head's gradient would bypass the engine's
reduction (KDTrainer(teacher_tokenizer=...) runs the same fused loss inside the forward and
supports them).

Importing this module never fails: without a suitable trl, TRL_MISSING says why and
constructing FusedGOLDTrainer raises ImportError with that text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..hf import engine_heads, models
from ..hf.logit_transform import logit_transform
from ..uld.fused import fused_linear_uld_loss
from ..uld.logits import uld_loss
from ..uld.vocab import build_vocab_map
from .trl_check import trl_class_problem

# What this module relies on: GOLDTrainer's compute_loss calling self.uld_loss_fn with the
# outputs' .logits, and ULDLoss's attributes (its options).
_ULD_ATTRIBUTES = ("crossentropy_weight", "distillation_weight", "student_temperature",
                   "teacher_temperature", "skip_student_eos", "skip_teacher_eos",
                   "use_extended_uld", "token_merge_strategy", "use_hybrid_loss",
                   "hybrid_matched_weight", "hybrid_unmatched_weight", "beta", "ignore_index")


def _trl_problem() -> str | None:
    return trl_class_problem("FusedGOLDTrainer", "trl.experimental.gold.gold_trainer",
                             ("GOLDTrainer", "ULDLoss"), ("compute_loss",))


TRL_MISSING = _trl_problem()
if TRL_MISSING is None:
    from trl.experimental.gold import GOLDTrainer as _Base
else:  # keeps this module importable (docs, tests); construction raises TRL_MISSING
    _Base = object


def fusable(model: nn.Module) -> bool:
    """Whether ``model``'s logits are its head applied to what the head module receives, up to
    a factor the model applies itself (no softcap; a scale only on a bias-free head)."""
    scale, softcap = logit_transform(model.config)
    return softcap is None and (scale == 1.0 or models.head(model)[1] is None)


class FusedULDLossFn:
    """TRL ULDLoss's call signature, kdkernels' loss: ``uld_loss`` on logits, or, while
    ``heads`` holds (student, teacher) models, ``fused_linear_uld_loss`` on the hidden states
    passed in place of the logits, with those models' LM heads.

    Options are TRL's ULDLoss's (``uld``: an object with its attributes, e.g. TRL's own
    ULDLoss), one to one: merge = token_merge_strategy, vocab_map (build_vocab_map: GOLD's exact
    string match) when use_hybrid_loss, offsets only when use_extended_uld; ``teacher_rows`` is
    the width of the teacher's logits (its head rows). ``impl``, ``chunk_size``,
    ``max_workspace_bytes`` and ``uld_top_k`` are the fused loss's."""

    def __init__(self, uld: Any, student_tokenizer, teacher_tokenizer, teacher_rows: int, *,
                 impl: str = "auto", chunk_size: int | None = None,
                 max_workspace_bytes: int | None = None, uld_top_k: int | None = None) -> None:
        missing = [a for a in _ULD_ATTRIBUTES if not hasattr(uld, a)]
        if missing:
            raise TypeError(f"uld must carry TRL ULDLoss's options; missing {', '.join(missing)}")
        self.use_extended_uld = bool(uld.use_extended_uld)  # GOLDTrainer reads it
        self.vocab_map = None
        if uld.use_hybrid_loss:
            self.vocab_map = build_vocab_map(student_tokenizer, teacher_tokenizer, teacher_rows)
        self.options = dict(
            merge=uld.token_merge_strategy, matched_weight=uld.hybrid_matched_weight,
            unmatched_weight=uld.hybrid_unmatched_weight, beta=uld.beta,
            student_temperature=uld.student_temperature,
            teacher_temperature=uld.teacher_temperature, skip_student_eos=uld.skip_student_eos,
            skip_teacher_eos=uld.skip_teacher_eos, distillation_weight=uld.distillation_weight,
            ce_weight=uld.crossentropy_weight, ignore_index=uld.ignore_index)
        self.fused_options = dict(impl=impl, chunk_size=chunk_size,
                                  max_workspace_bytes=max_workspace_bytes, uld_top_k=uld_top_k)
        self.heads: tuple[nn.Module, nn.Module] | None = None

    def __call__(self, student_logits, teacher_logits, student_labels, teacher_labels,
                 student_input_ids, teacher_input_ids, student_byte_offsets=None,
                 teacher_byte_offsets=None) -> torch.Tensor:
        device = student_logits.device
        s_off = t_off = None
        if self.use_extended_uld:  # TRL passes all-zero offsets otherwise: positional
            s_off, t_off = (None if x is None else x.to(device)
                            for x in (student_byte_offsets, teacher_byte_offsets))
        vocab_map = None if self.vocab_map is None else self.vocab_map.to(device)
        args = (student_labels, teacher_labels, student_input_ids, teacher_input_ids, s_off, t_off)
        if self.heads is None:
            return uld_loss(student_logits, teacher_logits, *args, vocab_map=vocab_map,
                            **self.options)
        with engine_heads.heads(*self.heads) as pair:
            (weight, bias), (t_weight, t_bias) = pair
            for name, h, w in (("student", student_logits, weight),
                               ("teacher", teacher_logits, t_weight)):
                if h.shape[-1] != w.shape[1]:
                    raise ValueError(
                        f"the {name}'s outputs have width {h.shape[-1]}, not its LM head's "
                        f"input width {w.shape[1]}: the model's forward does not end with "
                        "get_output_embeddings() on the final hidden states")
            hidden = student_logits.to(weight.dtype)
            t_hidden = teacher_logits.to(t_weight.dtype)
            return fused_linear_uld_loss(hidden, weight, t_hidden, t_weight, *args,
                                         student_bias=bias, teacher_bias=t_bias,
                                         vocab_map=vocab_map, **self.options,
                                         **self.fused_options)


@contextlib.contextmanager
def heads_pass_hidden(*pairs: tuple[nn.Module, bool]) -> Iterator[None]:
    """Within the block, each (model, anchored) model's LM-head module returns its input;
    ``anchored`` adds ``weight[:0].sum()`` (0) so the head's weight stays on the output's
    autograd graph (DDP's unused-parameter search)."""
    patched = []
    try:
        for model, anchored in pairs:
            head = model.get_output_embeddings()
            if head is None:
                raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
            if "forward" in vars(head):
                raise RuntimeError(f"the LM head of {type(model).__name__} already has an "
                                   "instance-level forward (nested FusedGOLDTrainer calls?)")

            def passthrough(x: torch.Tensor, _head: nn.Module = head,
                            _anchored: bool = anchored) -> torch.Tensor:
                return x + _head.weight[:0].sum().to(x.dtype) if _anchored else x

            head.forward = passthrough
            patched.append(head)
        yield
    finally:
        for head in patched:
            del head.forward


class FusedGOLDTrainer(_Base):  # type: ignore[misc, valid-type]
    """trl.experimental.gold.GOLDTrainer whose ULD loss is kdkernels' fused loss from the final
    hidden states (module docstring: how, and where it falls back to logits).

    Takes GOLDTrainer's arguments plus the fused loss's ``impl``, ``chunk_size``,
    ``max_workspace_bytes`` and ``uld_top_k`` (keyword-only). The ULD options are GOLDConfig's.
    With ``use_uld_loss=False`` it is GOLDTrainer unchanged."""

    def __init__(self, *args: Any, impl: str = "auto", chunk_size: int | None = None,
                 max_workspace_bytes: int | None = None, uld_top_k: int | None = None,
                 **kwargs: Any) -> None:
        if TRL_MISSING is not None:
            raise ImportError(TRL_MISSING)
        super().__init__(*args, **kwargs)
        self.trl_uld_loss_fn = self.uld_loss_fn
        if self.uld_loss_fn is None:
            return
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_fsdp_enabled or (self.is_deepspeed_enabled and plugin is not None
                                    and plugin.zero_stage == 3):
            raise ValueError("FusedGOLDTrainer does not support FSDP or DeepSpeed ZeRO-3: "
                             "GOLDTrainer computes the ULD loss after the student's forward, "
                             "where a sharded LM head's gradient would bypass the engine; use "
                             "kdkernels.integrations.hf.KDTrainer(teacher_tokenizer=...) there")
        student, teacher = self._models()
        self.uld_loss_fn = FusedULDLossFn(
            self.trl_uld_loss_fn, self._tokenizer, self.teacher_tokenizer,
            models.rows(models.head(teacher)[0]), impl=impl, chunk_size=chunk_size,
            max_workspace_bytes=max_workspace_bytes, uld_top_k=uld_top_k)
        self.fused_heads = fusable(student) and fusable(teacher)

    def _models(self) -> tuple[nn.Module, nn.Module]:
        unwrap = self.accelerator.unwrap_model
        return unwrap(self.model), unwrap(self.teacher_model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        fn = self.uld_loss_fn
        if (not isinstance(fn, FusedULDLossFn) or self.teacher_tokenizer is None
                or return_outputs or not self.fused_heads):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        student, teacher = self._models()
        anchored = self.accelerator.num_processes > 1
        fn.heads = (student, teacher)
        try:
            with heads_pass_hidden((student, anchored), (teacher, False)):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            fn.heads = None
