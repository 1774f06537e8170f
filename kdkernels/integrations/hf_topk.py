"""TopKKDTrainer: a transformers.Trainer that distils from the teacher's top-K (or sampled)
log-probs carried in the batches: a kdkernels teacher cache, or any dataset with
``teacher_ids`` / ``teacher_logprobs`` columns. No teacher model is loaded.

    trainer = TopKKDTrainer(model=student, args=TrainingArguments(...),
                            train_dataset=TeacherCache("CACHE"), tail="bucket",
                            kd_weight=0.8, ce_weight=0.2)
    trainer.train()

Positions follow the cache (docs/sparse_teachers.md): ``teacher_ids[:, t]`` describes the
token after ``input_ids[:, t]``, as a causal LM's ``logits[:, t]`` does, so it is paired with
the label ``input_ids[:, t + 1]``. (vLLM's ``prompt_logprobs`` entry t describes token t
itself: shift it by one, as examples/cache_from_logprobs.py does.) Batches of different
lengths or K are padded by TopKCollator.

Online, from a served teacher (kdkernels.teachers: VLLMTeacher, SGLangTeacher, KDKTeacher):

    trainer = TopKKDTrainer(model=student, args=..., train_dataset=ds_of_input_ids,
                            teacher_client=KDKTeacher(url, top_k=64))

asks ``teacher_client.score(input_ids)`` for each batch's targets instead of reading dataset
columns. ``score`` returns the same convention (position t: the token after input_ids[t]; a
client that cannot fill the last position leaves it empty, and the last position has no label
anyway), so the loss equals the one with the same targets passed as columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..hf import engine_heads
from ..hf.logit_transform import loss_transform_options
from ..sparse.api import fused_linear_topk_kd
from ..sparse.options import TopKOptions
from .hf_common import pop_loss_options, scaled_for_devices, student_hidden

TEACHER_KEYS = ("teacher_ids", "teacher_logprobs")


class TopKCollator:
    """Pads a list of examples {input_ids [L], teacher_ids [L, K], teacher_logprobs [L, K],
    optional labels [L] and attention_mask [L]} (tensors or lists) to the longest L and the
    largest K: input_ids with ``pad_token_id``, attention_mask 0, labels -100 (labels default
    to input_ids), teacher_ids -1 (an empty slot) and teacher_logprobs 0. With
    ``teacher=False`` (a trainer with a teacher_client) the examples need no teacher columns
    and the batch has none."""

    def __init__(self, pad_token_id: int = 0, ignore_index: int = -100, *,
                 teacher: bool = True) -> None:
        self.pad_token_id, self.ignore_index = int(pad_token_id), int(ignore_index)
        self.teacher = teacher

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("TopKCollator got an empty list of examples")
        rows = [_example(f, i, self.teacher) for i, f in enumerate(features)]
        length = max(r["input_ids"].shape[0] for r in rows)
        n = len(rows)
        out = {
            "input_ids": torch.full((n, length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((n, length), dtype=torch.long),
            "labels": torch.full((n, length), self.ignore_index, dtype=torch.long),
        }
        if self.teacher:
            k = max(r["teacher_ids"].shape[1] for r in rows)
            out["teacher_ids"] = torch.full((n, length, k), -1, dtype=torch.long)
            out["teacher_logprobs"] = torch.zeros((n, length, k),
                                                  dtype=rows[0]["teacher_logprobs"].dtype)
        for i, r in enumerate(rows):
            size = r["input_ids"].shape[0]
            out["input_ids"][i, :size] = r["input_ids"]
            out["attention_mask"][i, :size] = r.get("attention_mask", 1)
            out["labels"][i, :size] = r.get("labels", r["input_ids"])
            if self.teacher:
                width = r["teacher_ids"].shape[1]
                out["teacher_ids"][i, :size, :width] = r["teacher_ids"]
                out["teacher_logprobs"][i, :size, :width] = r["teacher_logprobs"]
        return out


def _example(feature: Mapping[str, Any], index: int,
             teacher: bool = True) -> dict[str, torch.Tensor]:
    missing = [k for k in ("input_ids",) + (TEACHER_KEYS if teacher else ()) if k not in feature]
    if missing:
        raise ValueError(f"example {index} has no {', '.join(missing)}: TopKCollator needs "
                         f"input_ids [L], teacher_ids [L, K] and teacher_logprobs [L, K]; it "
                         f"has {sorted(feature)}")
    row = {k: torch.as_tensor(v) for k, v in feature.items()
           if k in ("input_ids", "labels", "attention_mask") + (TEACHER_KEYS if teacher else ())}
    length = row["input_ids"].shape
    if row["input_ids"].dim() != 1:
        raise ValueError(f"example {index}: input_ids must be [L]; got {list(length)}")
    if not teacher:
        return _checked_extras(row, index, length)
    for key in TEACHER_KEYS:
        if row[key].dim() != 2 or row[key].shape[0] != length[0]:
            raise ValueError(f"example {index}: {key} must be [L, K] with L = {length[0]} "
                             f"(input_ids); got {list(row[key].shape)}")
    if row["teacher_ids"].shape != row["teacher_logprobs"].shape:
        raise ValueError(f"example {index}: teacher_ids {list(row['teacher_ids'].shape)} and "
                         f"teacher_logprobs {list(row['teacher_logprobs'].shape)} differ")
    return _checked_extras(row, index, length)


def _checked_extras(row: dict[str, torch.Tensor], index: int,
                    length: torch.Size) -> dict[str, torch.Tensor]:
    for key in ("labels", "attention_mask"):
        if key in row and row[key].shape != length:
            raise ValueError(f"example {index}: {key} must be [L] like input_ids "
                             f"({length[0]}); got {list(row[key].shape)}")
    return row


class TopKKDTrainer(Trainer):
    """transformers.Trainer whose compute_loss is fused_linear_topk_kd_loss on the student's
    final hidden states and LM head against the batch's teacher_ids / teacher_logprobs.

    Keyword options (all optional): every option of fused_linear_topk_kd_loss (TopKOptions)
    but those the trainer sets (hf_common.TRAINER_OPTIONS): tail, divergence, beta, skew,
    alpha, temperature, scale_by_t2, kd_weight, ce_weight, impl, chunk_size,
    max_workspace_bytes; the student's logit scale and softcap are read from its config
    (logit_transform). ``kd_options`` holds them as one TopKOptions. The dataset's extra
    columns survive remove_unused_columns; without a data_collator, TopKCollator pads.

    ``teacher_client`` (a kdkernels.teachers client, or anything with ``score(input_ids)
    -> (ids, logprobs) [B, L, K]``): the targets of each batch come from it, online; the
    dataset then needs only input_ids (and optional labels / attention_mask), and teacher
    columns in it are ignored. Batches must be right-padded (TopKCollator pads right): the
    server sees input_ids without the mask, so a real token must never follow a pad; the
    columns after the longest row are not sent.
    """

    def __init__(self, *args: Any, teacher_client: Any = None, **kwargs: Any) -> None:
        if "teacher_model" in kwargs:
            raise ValueError("TopKKDTrainer reads the teacher from the batches "
                             "(teacher_ids / teacher_logprobs) or from teacher_client (a "
                             "served teacher); for a teacher model use "
                             "kdkernels.integrations.hf.KDTrainer")
        if teacher_client is not None and not callable(getattr(teacher_client, "score", None)):
            raise TypeError(f"teacher_client must have score(input_ids) -> (teacher_ids, "
                            f"teacher_logprobs), like kdkernels.teachers.KDKTeacher; got "
                            f"{type(teacher_client).__name__}")
        self.teacher_client = teacher_client
        # Checked before the model work: a bad option raises before the first batch.
        self.kd_options = pop_loss_options(TopKOptions, kwargs, "TopKKDTrainer")
        if kwargs.get("data_collator") is None:
            tok = kwargs.get("processing_class")
            pad = getattr(tok, "pad_token_id", None)
            kwargs["data_collator"] = TopKCollator(0 if pad is None else pad,
                                                   teacher=teacher_client is None)
        super().__init__(*args, **kwargs)
        self.kd_log: dict[str, float] = {}

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys(list(self._signature_columns)
                                                     + list(TEACHER_KEYS)))

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                     return_outputs: bool = False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if self.teacher_client is not None:
            ids, logprobs = served_targets(self.teacher_client, input_ids, mask)
        else:
            missing = [k for k in TEACHER_KEYS if k not in inputs]
            if missing:
                raise ValueError(f"TopKKDTrainer reads the teacher from each batch: it needs "
                                 f"teacher_ids and teacher_logprobs [B, L, K] (as "
                                 f"kdkernels.cache.TeacherCache yields them) or a "
                                 f"teacher_client; this batch has no {', '.join(missing)} "
                                 f"(keys: {sorted(inputs)})")
            ids, logprobs = inputs["teacher_ids"], inputs["teacher_logprobs"]
        if ids.shape[:2] != input_ids.shape or ids.dim() != 3:
            raise ValueError(f"teacher_ids must be [B, L, K] with [B, L] = "
                             f"{list(input_ids.shape)} (input_ids); got {list(ids.shape)}")
        labels = inputs.get("labels")
        if labels is None:
            labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, -100)
        num = None if num_items_in_batch is None else float(num_items_in_batch)
        student = self.accelerator.unwrap_model(model)
        # Inside the wrapper's forward, so DDP/FSDP/ZeRO-3 reduce the head's gradient too.
        loss, kd, ce = engine_heads.run_in_forward(model, student, self._loss, student,
                                                   input_ids, mask, ids, logprobs, labels, num)
        loss = scaled_for_devices(self, loss, num)
        self.kd_log = {"kd": float(kd), "ce": float(ce)}
        return (loss, {"loss": loss, "kd": kd, "ce": ce}) if return_outputs else loss

    def _loss(self, student: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None,
              ids: torch.Tensor, logprobs: torch.Tensor, labels: torch.Tensor,
              num: float | None) -> tuple[torch.Tensor, ...]:
        hidden = student_hidden(student, input_ids, mask)
        opts = dataclasses.replace(self.kd_options, num_items=num,
                                   **loss_transform_options(student.config))
        with engine_heads.heads(student) as [(weight, bias)]:
            out = fused_linear_topk_kd(hidden[:, :-1], weight, ids[:, :-1], logprobs[:, :-1],
                                       labels[:, 1:], opts, student_bias=bias)
        return out.loss, out.kd, out.ce


def served_targets(client: Any, input_ids: torch.Tensor,
                   mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``client.score`` of a right-padded batch, on the batch's device: the columns up to the
    longest row are scored (the rest are pads: empty slots), rows with a pad before a real
    token are refused (the server reads no mask, so the pad would condition the teacher)."""
    width = input_ids.shape[1]
    if mask is not None:
        lengths = mask.sum(1)
        right = torch.arange(width, device=mask.device)[None, :] < lengths[:, None]
        if not bool((right == (mask != 0)).all()):
            raise ValueError("TopKKDTrainer with a teacher_client needs right-padded batches "
                             "(attention_mask a run of 1s, then 0s): the served teacher reads "
                             "no mask; pad on the right (tokenizer.padding_side = 'right')")
        width = max(int(lengths.max()), 1)
    ids, logprobs = client.score(input_ids[:, :width].detach().cpu())
    b = input_ids.shape[0]
    if ids.dim() != 3 or tuple(ids.shape[:2]) != (b, width) or logprobs.shape != ids.shape:
        raise ValueError(f"teacher_client.score returned teacher_ids {list(ids.shape)} and "
                         f"teacher_logprobs {list(logprobs.shape)} for input_ids "
                         f"[{b}, {width}]; expected [{b}, {width}, K] each")
    if width < input_ids.shape[1]:
        pad = input_ids.shape[1] - width
        ids = torch.nn.functional.pad(ids, (0, 0, 0, pad), value=-1)
        logprobs = torch.nn.functional.pad(logprobs, (0, 0, 0, pad), value=0.0)
    return ids.to(input_ids.device), logprobs.to(input_ids.device)
