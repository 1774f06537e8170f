"""The models a `kdk distill` run trains, one after the other, from the same initial weights
on the same batches: the student distilled from the teacher ("kd": from a teacher model, or
from a --teacher-url server's hidden states), a top-k student ("topk": from --teacher-cache, a
--teacher-url server's top-K, or the embedded default's own cache of its teacher, written just
before it), the CE-only student ("ce") and the --baseline naive yardstick ("naive")."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..teachers.errors import TeacherError
from .batches import streams
from .batches.served import ServedBatches
from .config import TrainConfig
from .objectives import cross_tokenizer
from .objectives.from_config import FUSED, NAIVE, TOPK, for_stage, topk_refusal
from .objectives.served import hidden_objective
from .on_policy import batch_source
from .runtime import checkpoint, distributed
from .runtime.loop import Stage, train
from .sources import embedded_cache, prompts, served_teacher, teacher_cache
from .sources.run_inputs import CACHE, CROSS, EMBEDDED, SERVED, RunInputs


@dataclass
class StagePlan:
    name: str
    teacher: nn.Module | None
    kind: str  # the objective: FUSED, NAIVE, TOPK or CROSS (ULD / hybrid across tokenizers)
    data: Any  # what it trains on; None: the embedded top-k cache, written on its turn


def plan(cfg: TrainConfig, inputs: RunInputs, notes: dict[str, str]) -> list[StagePlan]:
    """The stages this run's inputs allow; a top-k student the embedded default cannot have
    is noted in ``notes`` with the reason."""
    if inputs.kind == CACHE:
        plans = [StagePlan("topk", None, TOPK, inputs.train)]
    elif inputs.kind == SERVED:
        hidden = inputs.served.head is not None
        plans = [StagePlan(inputs.served.options.stage(), None, FUSED if hidden else TOPK,
                           inputs.train)]
    elif inputs.kind == CROSS:
        plans = [StagePlan("kd", inputs.teacher, CROSS, inputs.train)]
        notes["cross-tokenizer"] = inputs.cross.describe()
    else:
        plans = [StagePlan("kd", inputs.teacher, FUSED, inputs.train)]
        embedded = inputs.kind == EMBEDDED and cfg.cache_top_k > 0
        refusal = topk_refusal(cfg) if embedded else None
        if embedded and isinstance(inputs.train, streams.TokenStream):
            refusal = "prompt/completion data: the top-k cache holds no prompt mask"
        if refusal:
            notes["top-k student"] = f"skipped: {refusal}"
        elif embedded:
            plans.append(StagePlan("topk", inputs.teacher, TOPK, None))
    if inputs.compare_ce:  # a served teacher's windows without its targets: no requests
        plain = inputs.train.tokens if isinstance(inputs.train, ServedBatches) else inputs.train
        plans.append(StagePlan("ce", None, FUSED, plain))
    if cfg.baseline == "naive" and inputs.teacher is not None:
        plans.append(StagePlan("naive", inputs.teacher, NAIVE, inputs.train))
    return plans


def train_all(cfg: TrainConfig, inputs: RunInputs, plans: list[StagePlan], *, out: Path,
              world: distributed.World, parallel: str, resume: bool,
              fingerprint: dict[str, Any], notes: dict[str, str]) -> dict[str, dict]:
    """Each stage's summary, in order; an interrupted stage (Ctrl-C) ends the run."""
    results: dict[str, dict] = {}
    for p in plans:
        teacher, data, info = p.teacher, p.data, None
        if p.kind == TOPK:
            if data is None:
                data, info = embedded_cache.build(cfg, teacher, inputs.tok, inputs.train, out,
                                                  world)
            elif not isinstance(data, ServedBatches):
                info = teacher_cache.facts(data)
            teacher = None  # a top-k student never runs a teacher
        student = copy.deepcopy(inputs.student)  # identical initial weights for every student
        served = inputs.served if isinstance(data, ServedBatches) else None
        if served is not None and p.kind == FUSED:  # hidden mode: the served head
            objective = hidden_objective(cfg, student, served.head, served.logit_transform)
        elif p.kind == CROSS:
            objective = cross_tokenizer.from_config(cfg, student, teacher, inputs.cross.mode,
                                                    inputs.cross.vocab_map)
        else:
            objective = for_stage(cfg, p.kind, student, teacher)
        stage = Stage(p.name, objective, teacher, cfg.max_steps,
                      cfg.lr, cfg.seed, out / p.name, inputs.tok,
                      resume=checkpoint.latest(out / p.name) if resume else None,
                      fingerprint={**fingerprint, "stage": p.name},
                      generation=_generation(cfg, inputs.tok, teacher, world, parallel, notes))
        if served is None:
            results[p.name] = train(stage, cfg, data, inputs.held, world, parallel)
        else:
            results[p.name] = _train_served(stage, cfg, data, inputs, world, parallel, served)
        results[p.name]["dir"] = str(out / p.name)
        if inputs.cross is not None:  # bits per byte (and the distilled student's label)
            inputs.cross.finish(results[p.name], p.name)
        if info is not None:
            results[p.name]["cache"] = info
        if results[p.name]["interrupted"]:
            print(f"\ninterrupted: checkpoint saved under {out / p.name / 'checkpoints'}; "
                  f"continue with the same command plus --resume", file=sys.stderr)
            break
    return results


def _train_served(stage: Stage, cfg: TrainConfig, data: ServedBatches, inputs: RunInputs,
                  world: distributed.World, parallel: str,
                  served: served_teacher.ServedInputs) -> dict[str, Any]:
    """train() on a served teacher's batches: a server that fails for good (after the
    client's retries) stops the run with an error naming its URL and the checkpoint left
    intact; the summary gets the teacher's URL and the time spent waiting on it."""
    try:
        summary = train(stage, cfg, data, inputs.held, world, parallel)
    except TeacherError as err:  # unreachable or answering garbage after the retries
        if data.failed_step is None:  # not raised by a request
            raise
        raise served_teacher.stopped(err, served.options, stage.out_dir,
                                     data.failed_step) from err
    finally:
        data.close()
    timing = data.timing()
    summary["label"] = served.options.label()
    summary["teacher_server"] = {**served.options.fingerprint(), **timing,
                                 "model": getattr(served.client, "model_id", None),
                                 "wait_share": timing["wait_s"] / summary["wall_s"]
                                 if summary["wall_s"] > 0 else 0.0}
    return summary


def _generation(cfg: TrainConfig, tok, teacher, world: distributed.World, parallel: str,
                notes: dict[str, str]) -> batch_source.OnPolicy | None:
    """The on-policy / seq-KD batch source of a student distilled from a teacher model (the
    CE-only student has no teacher to score completions and stays on the dataset)."""
    if teacher is None or not batch_source.enabled(cfg):
        return None
    notes["on-policy"] = batch_source.describe(cfg)
    loaded = prompts.load(cfg.prompts, tok) if cfg.prompts else None
    return batch_source.OnPolicy(cfg, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                 prompts=loaded, synced=parallel == "fsdp" and world.size > 1)
