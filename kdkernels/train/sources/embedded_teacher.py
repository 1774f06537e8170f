"""The embedded default's teacher: a small Llama trained on the run's data with CE, cached
under the local cache by everything that shapes it, so later runs (and every --seed) reuse
it and train only the students."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config import TrainConfig
from ..objectives.from_config import distill_objective
from ..runtime import checkpoint, distributed
from ..runtime.evaluation import heldout_ce
from ..runtime.loop import Stage, train
from . import tiny_llama
from .local_cache import cache_root, content_key
from .training_data import TrainingData


def load_or_train(cfg: TrainConfig, data: TrainingData, held: list, out: Path,
                  world: distributed.World, parallel: str) -> tuple[torch.nn.Module, dict]:
    """The cached teacher for this data and config, or a freshly trained (and cached) one,
    in eval mode, with its summary for the report (training checkpoints go to out/teacher)."""
    from transformers import AutoModelForCausalLM

    tok = data.tok
    key = content_key({"data": data.key, "size": cfg.teacher_size.as_dict(),
                       "steps": cfg.teacher_steps, "lr": cfg.teacher_lr, "seq": cfg.seq_len,
                       "batch": cfg.batch_size, "warmup": cfg.warmup_steps,
                       "min_lr": cfg.min_lr_ratio, "vocab": len(tok), "bf16": cfg.bf16})
    cached = cache_root() / f"teacher-{key}"
    if (cached / "summary.json").exists():
        teacher = AutoModelForCausalLM.from_pretrained(str(cached)).to(world.device)
        summary = json.loads((cached / "summary.json").read_text())
        summary.update(cached=True, dir=None, heldout_ce=heldout_ce(teacher, held, world.device,
                                                                    cfg.bf16))
        return teacher.eval(), summary
    torch.manual_seed(0)  # the teacher is fixed across --seed: seeds vary the students
    teacher = tiny_llama.build_llama(cfg.teacher_size, len(tok), cfg.seq_len,
                                     eos_id=tok.eos_token_id)
    stage = Stage("teacher", distill_objective(cfg, teacher, None), None, cfg.teacher_steps,
                  cfg.teacher_lr, 0, out / "teacher", tok, fingerprint={"teacher_key": key})
    summary = train(stage, cfg, data.train, held, world, parallel)
    summary["dir"] = str(out / "teacher")
    if world.is_main and not summary["interrupted"]:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        teacher.save_pretrained(str(tmp), state_dict=checkpoint.full_state_dict(teacher))
        tok.save_pretrained(str(tmp))
        (tmp / "summary.json").write_text(json.dumps({k: v for k, v in summary.items()
                                                      if k != "dir"}))
        tmp.rename(cached) if not cached.exists() else shutil.rmtree(tmp)
    return teacher.eval(), summary
