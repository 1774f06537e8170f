"""`kdk distill` end to end: source -> stages -> report.

Without --teacher this is the embedded default: the Python standard library as corpus, a
locally trained byte-level BPE, a small Llama teacher trained once and cached under
~/.cache/kdkernels, then a smaller student trained with dense KD, one from a top-K cache of
the teacher (written into the run directory), and one with CE only, all from the same
initial weights on the same batches. With --teacher/--student it distils Hugging Face
checkpoints instead; with --teacher-cache it trains from a teacher-logit cache, no teacher;
with --teacher-url from a teacher in an inference server (sources/served_teacher.py).
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
from .sources import served_teacher
from .sources import teacher_cache as cache_source
from .sources.run_inputs import open_inputs


def run(cfg: TrainConfig, *, teacher_path: str | None = None, student_path: str | None = None,
        data: str | None = None, teacher_cache: str | None = None, overwrite: bool = False,
        resume: bool = False, parallel: str = "ddp", compare_ce: bool | None = None,
        preset: str = "default", served: served_teacher.ServedTeacher | None = None) -> dict:
    """The whole `kdk distill`; returns the per-model summaries (rank 0 writes the report).
    served: the --teacher-url options (a teacher in an inference server)."""
    t0 = time.perf_counter()
    _check(cfg, teacher_path, teacher_cache)
    if served is not None:
        _check_served(cfg, served, teacher_path, teacher_cache)
    world = distributed.init(cfg.device)
    notes = _threads(cfg, world)
    out = Path(cfg.output)
    fingerprint = {**cfg.fingerprint(), "teacher": teacher_path, "student": student_path,
                   "data": data, "world": world.size, "parallel": parallel}
    if teacher_cache is not None:
        fingerprint["teacher_cache"] = cache_source.identity(teacher_cache)
    if served is not None:
        fingerprint.update(served.fingerprint())
    prepare_output(out, overwrite=overwrite, resume=resume, world=world, fingerprint=fingerprint)
    inputs = open_inputs(cfg, teacher_path=teacher_path, student_path=student_path, data=data,
                         teacher_cache=teacher_cache, compare_ce=compare_ce, out=out,
                         world=world, parallel=parallel, served=served)
    results = {} if inputs.teacher_summary is None else {"teacher": inputs.teacher_summary}
    try:
        results.update(stages.train_all(cfg, inputs, stages.plan(cfg, inputs, notes), out=out,
                                        world=world, parallel=parallel, resume=resume,
                                        fingerprint=fingerprint, notes=notes))
    finally:
        if inputs.served is not None:
            inputs.served.client.close()
    if served is not None:
        notes.update(_served_notes(served, results))
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


def _check_served(cfg: TrainConfig, served: served_teacher.ServedTeacher,
                  teacher_path: str | None, teacher_cache: str | None) -> None:
    """Refusals of --teacher-url combinations, before any model, data or request."""
    served.check()
    other = [f for f, v in (("--teacher", teacher_path), ("--teacher-cache", teacher_cache))
             if v is not None]
    if other:
        raise ValueError(f"--teacher-url replaces {' and '.join(other)} (the server is the "
                         "teacher); pass one of them")
    if batch_source.enabled(cfg):
        raise ValueError("--on-policy/--seq-kd generate completions and score them with a "
                         "teacher model in this process; a --teacher-url run has none (drop "
                         "--on-policy/--seq-kd or --teacher-url)")
    if cfg.baseline == "naive":
        raise ValueError("--baseline naive compares the fused dense loss with materialised "
                         "logits of a teacher model in this process; a --teacher-url run has "
                         "none (drop --baseline naive)")


def _served_notes(served: served_teacher.ServedTeacher, results: dict) -> dict[str, str]:
    """The report's lines on the served teacher: what it was and the time waited on it."""
    notes = {"teacher server": served.describe()}
    for r in results.values():
        if "teacher_server" in r:
            notes["waiting on the teacher"] = served_teacher.timing_line(r["teacher_server"],
                                                                         r["wall_s"])
    return notes


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
    served = {k: v["teacher_server"] for k, v in results.items() if "teacher_server" in v}
    checkpoint.write_json(out / "results.json", {"results": summary,
                                                 "kd_benefit": report.kd_benefit(results),
                                                 "topk": report.topk_benefit(results),
                                                 **({"teacher_server": served} if served
                                                    else {})})
    print(md.read_text())
