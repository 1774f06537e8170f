"""The models and data of one `kdk distill` run, from one of four sources: the embedded
default (its corpus, tokenizer, cached teacher and a fresh student), --teacher/--student
with --data (or the embedded corpus), --teacher-cache (a cache and a student, no teacher
model), or --teacher-url (a served teacher and a student). Refusals of option combinations
that a source cannot serve are raised here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...hf import models
from ..batches import streams
from ..batches.cache_data import CacheData
from ..batches.served import ServedBatches
from ..config import TrainConfig
from ..objectives.from_config import topk_refusal
from ..runtime import distributed
from ..runtime.evaluation import heldout_ce
from . import (
    cross_pair,
    embedded_teacher,
    hf_pair,
    served_teacher,
    teacher_cache,
    tiny_llama,
    training_data,
)

EMBEDDED, HF_PAIR, CACHE, SERVED = "embedded", "hf", "cache", "served"
CROSS = "cross"  # --teacher/--student with different tokenizers (sources/cross_pair.py)


@dataclass
class RunInputs:
    kind: str  # EMBEDDED, HF_PAIR, CACHE or SERVED
    student: nn.Module  # the initial weights every student starts from
    tok: Any
    teacher: nn.Module | None  # None with a teacher cache or a served teacher
    # what the students train on (ServedBatches: the windows with the server's targets)
    train: torch.Tensor | streams.TokenStream | CacheData | ServedBatches
    held: list  # held-out batches, the same for every model
    summary: str  # the data, for the report
    compare_ce: bool  # whether a CE-only student is trained too
    teacher_summary: dict[str, Any] | None  # the teacher's row of the report
    served: served_teacher.ServedInputs | None = None  # --teacher-url: client, head
    cross: cross_pair.CrossInputs | None = None  # CROSS: mode, windows, held-out bytes


def open_inputs(cfg: TrainConfig, *, teacher_path: str | None, student_path: str | None,
                data: str | None, teacher_cache: str | None, compare_ce: bool | None,
                out: Path, world: distributed.World, parallel: str,
                served: served_teacher.ServedTeacher | None = None) -> RunInputs:
    """The run's inputs (compare_ce None: the source's default), the models' context length
    checked against --seq-len."""
    if teacher_path is None or teacher_cache is not None or served is not None:
        cross_pair.refuse_flags(cfg, "this run has no --teacher/--student pair (the embedded "
                                     "default, --teacher-cache or --teacher-url)")
    if served is not None:
        inputs = _from_server(cfg, served, student_path, data, compare_ce, world)
    elif teacher_cache is not None:
        inputs = _from_cache(cfg, teacher_cache, student_path, data, compare_ce, world)
    elif teacher_path is None:
        if student_path is not None:
            raise ValueError("--student needs --teacher, --teacher-cache or --teacher-url "
                             "(the embedded default builds both)")
        inputs = _embedded(cfg, data, compare_ce, out, world, parallel)
    else:
        if student_path is None:
            raise ValueError("--teacher needs --student (a Hugging Face checkpoint to train)")
        inputs = _hf_pair(cfg, teacher_path, student_path, data, compare_ce, world)
    models.check_seq_len(inputs.student, cfg.seq_len, "student")
    if inputs.teacher is not None:
        models.check_seq_len(inputs.teacher, cfg.seq_len, "teacher")
    return inputs


def _from_cache(cfg: TrainConfig, path: str, student_path: str | None, data: str | None,
                compare_ce: bool | None, world: distributed.World) -> RunInputs:
    refusal = topk_refusal(cfg)
    if refusal:
        raise ValueError(refusal)
    if cfg.baseline == "naive":
        raise ValueError("--baseline naive compares the fused dense loss with materialised "
                         "teacher logits; a --teacher-cache run has no teacher model")
    c = teacher_cache.open_inputs(cfg, path, student_path, data, world)
    # the CE student (if any) reads the same cached sequences
    return RunInputs(CACHE, c.student, c.tok, None, c.data, c.held, c.summary,
                     (student_path is None) if compare_ce is None else compare_ce, None)


def _from_server(cfg: TrainConfig, served: served_teacher.ServedTeacher,
                 student_path: str | None, data: str | None, compare_ce: bool | None,
                 world: distributed.World) -> RunInputs:
    if served.mode == served_teacher.TOPK:
        refusal = topk_refusal(cfg)
        if refusal:
            raise ValueError(refusal)
    s = served_teacher.open_inputs(cfg, served, student_path, data, world)
    # like a cache run: the embedded student gets a CE-only twin unless told otherwise
    return RunInputs(SERVED, s.student, s.tok, None, s.batches, s.held, s.summary,
                     (student_path is None) if compare_ce is None else compare_ce, None, s)


def _embedded(cfg: TrainConfig, data: str | None, compare_ce: bool | None, out: Path,
              world: distributed.World, parallel: str) -> RunInputs:
    d = training_data.prepare(cfg, data, None, world)
    held = streams.eval_batches(d.held, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    teacher, summary = embedded_teacher.load_or_train(cfg, d, held, out, world, parallel)
    torch.manual_seed(cfg.seed)
    student = tiny_llama.build_llama(cfg.student_size, len(d.tok), cfg.seq_len,
                                     eos_id=d.tok.eos_token_id)
    return RunInputs(EMBEDDED, student, d.tok, teacher, d.train, held, d.summary,
                     True if compare_ce is None else compare_ce, summary)


def _hf_pair(cfg: TrainConfig, teacher_path: str, student_path: str, data: str | None,
             compare_ce: bool | None, world: distributed.World) -> RunInputs:
    torch.manual_seed(cfg.seed)
    pair = hf_pair.load(teacher_path, student_path, dtype=cfg.teacher_dtype,
                        device=world.device)
    if pair.cross:
        return _cross_pair(cfg, pair, data, compare_ce, world)
    cross_pair.refuse_flags(cfg, "these two share one tokenizer, so the exact token-level KD "
                                 "loss runs")
    d = training_data.prepare(cfg, data, pair.tok, world)
    held = streams.eval_batches(d.held, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    summary = {"heldout_ce": heldout_ce(pair.teacher, held, world.device, cfg.bf16),
               "params": sum(p.numel() for p in pair.teacher.parameters()),
               "steps": 0, "cached": False}
    return RunInputs(HF_PAIR, pair.student, d.tok, pair.teacher, d.train, held, d.summary,
                     False if compare_ce is None else compare_ce, summary)


def _cross_pair(cfg: TrainConfig, pair: hf_pair.Pair, data: str | None,
                compare_ce: bool | None, world: distributed.World) -> RunInputs:
    """Different tokenizers: text windows read by both, the cross-tokenizer loss."""
    cross_pair.check_options(cfg)
    train_docs, held_docs, source = cross_pair.documents_of(cfg, data)
    rows = models.rows(models.head(pair.teacher)[0])
    c = cross_pair.build(cfg, pair.student_tok, pair.teacher_tok, rows, train_docs, held_docs,
                         source)
    summary = c.teacher_summary(pair.teacher, world.device, cfg.bf16)
    return RunInputs(CROSS, pair.student, pair.student_tok, pair.teacher, c.windows,
                     c.held.student, c.summary, False if compare_ce is None else compare_ce,
                     summary, cross=c)
