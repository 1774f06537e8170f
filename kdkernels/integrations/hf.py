"""KDTrainer: a transformers.Trainer that distils a teacher with the fused KD loss.

    trainer = KDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                        train_dataset=ds, data_collator=collator, temperature=2.0,
                        kd_weight=0.5, ce_weight=0.5)
    trainer.train()

The student's and teacher's final hidden states go to fused_linear_kd_loss with their LM
heads, so the [tokens x vocab] logits are never built. Labels come from the batch
("labels", -100 for ignored tokens, as DataCollatorForLanguageModeling makes them) and are
shifted the Hugging Face way; gradient accumulation and multi-process runs are normalised by
the Trainer's num_items_in_batch, so the loss equals one big batch's mean.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..dense.api import fused_linear_kd
from ..hf import engine_heads, models
from ..hf.logit_transform import logit_transform, loss_transform_options
from ..options import KDOptions, option_fields
from . import hf_cross_tokenizer as cross
from .hf_common import pop_loss_options, scaled_for_devices, shard_teacher, student_hidden
from .hf_cross_tokenizer import CrossTokenizerCollator
from .hf_topk import TopKCollator, TopKKDTrainer

__all__ = ["KDTrainer", "TopKKDTrainer", "TopKCollator", "CrossTokenizerCollator",
           "logit_transform"]


class KDTrainer(Trainer):
    """transformers.Trainer whose compute_loss is teacher->student logit distillation.

    Keyword options (all optional): every option of fused_linear_kd_loss (KDOptions) but
    those the trainer sets (hf_common.TRAINER_OPTIONS): divergence, beta, skew, alpha,
    temperature, scale_by_t2, kd_weight, ce_weight, impl, chunk_size, max_workspace_bytes;
    logit scales and softcaps are read from the models' configs (logit_transform: Cohere,
    Granite, Falcon-H1, Gemma-2, ...). ``kd_options`` holds them as one KDOptions.

    ``teacher_tokenizer=`` (with the student's tokenizer as ``processing_class``) of another
    vocabulary switches to cross-tokenizer distillation (hf_cross_tokenizer): text batches
    tokenized by both sides (CrossTokenizerCollator, the default collator then), the fused
    ULD / GOLD-hybrid loss from both models' hidden states, with ``cross_tokenizer`` ("uld" |
    "hybrid"), ``merge`` and the loss's options (ULDTrainerOptions) instead of KDOptions.
    """

    def __init__(self, *args: Any, teacher_model: nn.Module, teacher_tokenizer: Any = None,
                 **kwargs: Any) -> None:
        if teacher_model is None:
            raise ValueError("KDTrainer needs teacher_model (a Hugging Face causal LM)")
        # Checked before the model work: a bad option raises before the first batch.
        kd_names = [f.name for f in option_fields(KDOptions)]
        uld = cross.pop_options(kwargs, teacher_tokenizer, kd_names)
        self.kd_options = (None if uld is not None
                           else pop_loss_options(KDOptions, kwargs, "KDTrainer"))
        self.uld_options, self.cross_loss = uld, None
        super().__init__(*args, **kwargs)
        student = self.accelerator.unwrap_model(self.model)
        tok = getattr(self, "processing_class", None)
        if uld is None:
            models.check_pair(student, teacher_model, tok,
                              tok if teacher_tokenizer is None else teacher_tokenizer)
        else:
            self.cross_loss = cross.CrossTokenizerLoss(uld, student, teacher_model, tok,
                                                       teacher_tokenizer, self.args.device)
            self.loss_is_scaled_for_ga = False  # a per-sample mean: the Trainer divides by GA
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_model = teacher_model.to(self.args.device).eval()
        self.teacher_model.requires_grad_(False)
        self.teacher_engine = shard_teacher(self, self.teacher_model)
        self.kd_log: dict[str, float] = {}

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.uld_options is not None:  # keep the text columns the collator reads
            self._signature_columns = cross.signature_columns(self._signature_columns)

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                     return_outputs: bool = False, num_items_in_batch=None):
        if self.cross_loss is not None:
            student = self.accelerator.unwrap_model(model)
            loss = engine_heads.run_in_forward(model, student, self.cross_loss, student,
                                               self.teacher_model, self.teacher_engine,
                                               *self.cross_loss.batch(inputs))
            self.kd_log = {"uld": float(loss.detach())}
            return (loss, {"loss": loss}) if return_outputs else loss
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        if labels is None:
            labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, -100)
        num = None if num_items_in_batch is None else float(num_items_in_batch)
        student = self.accelerator.unwrap_model(model)
        # Inside the wrapper's forward, so DDP/FSDP/ZeRO-3 reduce the head's gradient too.
        loss, kd, ce = engine_heads.run_in_forward(model, student, self._loss, student,
                                                   input_ids, mask, labels, num)
        loss = scaled_for_devices(self, loss, num)
        self.kd_log = {"kd": float(kd), "ce": float(ce)}
        return (loss, {"loss": loss, "kd": kd, "ce": ce}) if return_outputs else loss

    def _loss(self, student: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None,
              labels: torch.Tensor, num: float | None) -> tuple[torch.Tensor, ...]:
        hidden = student_hidden(student, input_ids, mask)
        teacher_hidden = engine_heads.teacher_hidden(self.teacher_engine, self.teacher_model,
                                                     input_ids, mask)
        opts = dataclasses.replace(
            self.kd_options, num_items=num,
            **loss_transform_options(student.config, self.teacher_model.config))
        with engine_heads.heads(student, self.teacher_model) as pair:
            (weight, bias), (t_weight, t_bias) = pair
            out = fused_linear_kd(hidden[:, :-1], weight, teacher_hidden[:, :-1], t_weight,
                                  labels[:, 1:], opts, student_bias=bias, teacher_bias=t_bias)
        return out.loss, out.kd, out.ce
