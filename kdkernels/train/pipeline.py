"""`kdk distill` end to end: source -> stages -> report.

Without --teacher this is the embedded default: the Python standard library as corpus, a
locally trained byte-level BPE, a small Llama teacher trained once and cached under
~/.cache/kdkernels, then a smaller student trained with dense KD, one from a top-K cache of
the teacher (written into the run directory), and one with CE only, all from the same
initial weights on the same batches. With --teacher/--student it distils Hugging Face
checkpoints instead; with --teacher-cache it trains from a teacher-logit cache, no teacher.
sources/run_inputs.py opens the source, stages.py trains the models, report.py writes the
report.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from . import report, stages
from .config import TrainConfig
from .on_policy import batch_source
from .runtime import checkpoint, distributed, threads
from .runtime.run_dir import prepare_output
from .sources import teacher_cache as cache_source
from .sources.run_inputs import open_inputs


def run(cfg: TrainConfig, *, teacher_path: str | None = None, student_path: str | None = None,
        data: str | None = None, teacher_cache: str | None = None, overwrite: bool = False,
        resume: bool = False, parallel: str = "ddp", compare_ce: bool | None = None,
        preset: str = "default") -> dict:
    """The whole `kdk distill`; returns the per-model summaries (rank 0 writes the report)."""
    t0 = time.perf_counter()
    _check(cfg, teacher_path, teacher_cache)
    world = distributed.init(cfg.device)
    notes = _threads(cfg, world)
    out = Path(cfg.output)
    fingerprint = {**cfg.fingerprint(), "teacher": teacher_path, "student": student_path,
                   "data": data, "world": world.size, "parallel": parallel}
    if teacher_cache is not None:
        fingerprint["teacher_cache"] = cache_source.identity(teacher_cache)
    prepare_output(out, overwrite=overwrite, resume=resume, world=world, fingerprint=fingerprint)
    inputs = open_inputs(cfg, teacher_path=teacher_path, student_path=student_path, data=data,
                         teacher_cache=teacher_cache, compare_ce=compare_ce, out=out,
                         world=world, parallel=parallel)
    results = {} if inputs.teacher_summary is None else {"teacher": inputs.teacher_summary}
    results.update(stages.train_all(cfg, inputs, stages.plan(cfg, inputs, notes), out=out,
                                    world=world, parallel=parallel, resume=resume,
                                    fingerprint=fingerprint, notes=notes))
    if world.is_main:
        settings = report.run_settings(cfg.to_dict(), kind=inputs.kind,
                                       student=student_path is not None, data=data is not None,
                                       topk="topk" in results)
        _report(out, cfg, settings, results, inputs.summary, t0, preset, world, notes)
    return results


def _check(cfg: TrainConfig, teacher_path: str | None, teacher_cache: str | None) -> None:
    """Refusals that need no model or data: before any work."""
    if teacher_cache is not None and teacher_path is not None:
        raise ValueError("--teacher-cache replaces --teacher (the cache holds the teacher's "
                         "top-K log-probs); pass one of them")
    batch_source.check_options(cfg)
    if teacher_cache is not None and batch_source.enabled(cfg):
        raise ValueError("--on-policy/--seq-kd score generated completions with a teacher "
                         "model; a --teacher-cache run has none (drop --teacher-cache or them)")


def _threads(cfg: TrainConfig, world: distributed.World) -> dict[str, str]:
    """Set the CPU thread count; the report's note of the choice and its reason."""
    if world.device.type != "cpu":
        return {}
    choice = threads.choose(cfg.threads, world.size)
    torch.set_num_threads(choice.threads)
    if world.is_main:
        print(f"kdk distill: torch threads {choice.reason}", file=sys.stderr)
    return {"torch threads": choice.reason}


def _report(out: Path, cfg: TrainConfig, settings: dict, results: dict, source: str,
            t0: float, preset: str, world: distributed.World, notes: dict[str, str]) -> None:
    context = {"preset": preset, "corpus": source, "seed": cfg.seed,
               "world size": world.size, "device": str(world.device),
               "total wall time (s)": f"{time.perf_counter() - t0:.1f}", **notes}
    if "naive" in results:
        context.update(report.loss_agreement(out))
    if any(r.get("interrupted") for r in results.values()):
        context["status"] = "INTERRUPTED (resume with --resume)"
    md = report.write(out, results, settings, context)
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "evals"} for k, v in results.items()}
    checkpoint.write_json(out / "results.json", {"results": summary,
                                                 "kd_benefit": report.kd_benefit(results),
                                                 "topk": report.topk_benefit(results)})
    print(md.read_text())
