"""`kdk distill --preset on-policy`: off-policy against on-policy KD from one teacher and one
initialisation, judged by two metrics.

Students (same init, same dataset batches where they use dataset batches):
- `kd`: today's off-policy default (forward KL on dataset windows);
- `kd-<div>`: off-policy with the on-policy student's divergence (so the data source is the
  only difference from the next one); skipped when that divergence is forward KL;
- `on-policy`: the preset's --on-policy LAMBDA with its --divergence.

Metrics, per student: held-out CE (nats/token, the fixed held-out windows), and the teacher's
mean per-token NLL of the student's own sampled continuations of held-out prompts (the first
--prompt-len tokens of those windows), which is what on-policy distillation optimises. Every
student (and the teacher, as the reference) is sampled with the same settings and seeds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import report
from ..batches import completions, windows
from ..config import TrainConfig
from ..objectives.from_config import distill_objective
from ..runtime import checkpoint, distributed, metrics, threads
from ..runtime.evaluation import heldout_ce
from ..runtime.loop import Stage, train
from ..runtime.run_dir import prepare_output
from ..sources import embedded_teacher, tiny_llama, training_data
from ..sources.run_inputs import EMBEDDED
from . import batch_source, generation

PRESET_NAMES = ("on-policy", "on-policy-smoke")


def students(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, config) of each student the preset trains."""
    off = dataclasses.replace(cfg, on_policy=0.0, seq_kd=False)
    out = [("kd", dataclasses.replace(off, divergence="forward_kl"))]
    if cfg.divergence != "forward_kl":
        out.append((f"kd-{cfg.divergence}", off))
    out.append(("on-policy", cfg))
    return out


@torch.no_grad()
def teacher_nll_of_samples(sampler: torch.nn.Module, teacher: torch.nn.Module,
                           heldout: list[torch.Tensor], sampling: generation.Sampling,
                           prompt_len: int, *, seed: int, eos_id: int | None, pad_id: int,
                           device: torch.device, bf16: bool = False) -> dict[str, float]:
    """The teacher's mean NLL (nats/token) of `sampler`'s continuations of the held-out
    windows' first prompt_len tokens, over the completion tokens (through the first EOS);
    also the mean completion length. Batch i is sampled with seed key (seed, i), so every
    sampler sees the same prompts and seeds."""
    batches = []
    for i, ids in enumerate(heldout):
        prompt = ids[:, :prompt_len].to(device)
        b = generation.generate_batch(sampler, prompt, torch.ones_like(prompt), sampling,
                                      seed=generation.key_seed("preset eval", seed, i),
                                      eos_id=eos_id, pad_id=pad_id, bf16=bf16)
        # Prompts are whole windows (no left pads) and pads follow the EOS, so the causal
        # forward without a mask scores every kept completion token as generated.
        batches.append((b["input_ids"], b["labels"]))
    count = sum(int((y != completions.IGNORE_INDEX).sum()) for _, y in batches)
    rows = sum(y.shape[0] for _, y in batches)
    nll = heldout_ce(teacher, batches, device, autocast=bf16) if count else math.nan
    return {"teacher_nll": nll, "completion_len": count / max(rows, 1)}


def _stage(name: str, cfg: TrainConfig, student: torch.nn.Module, teacher, tok, out: Path,
           fingerprint: dict[str, Any], resume: bool) -> Stage:
    gen = None
    if batch_source.enabled(cfg):
        gen = batch_source.OnPolicy(cfg, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    return Stage(name, distill_objective(cfg, student, teacher), teacher, cfg.max_steps,
                 cfg.lr, cfg.seed, out / name, tok,
                 resume=checkpoint.latest(out / name) if resume else None,
                 fingerprint={**fingerprint, "stage": name, "divergence": cfg.divergence,
                              "on_policy": cfg.on_policy}, generation=gen)


def run(cfg: TrainConfig, *, overwrite: bool = False, resume: bool = False,
        preset: str = "on-policy", variants: list[tuple[str, TrainConfig]] | None = None,
        init: torch.nn.Module | None = None) -> dict[str, dict[str, Any]]:
    """Train the preset's students (or `variants`, for tuning: (name, config) pairs sharing
    cfg's teacher and data) from one initialisation (`init`, e.g. a trained student, or a
    fresh one seeded by cfg.seed) and write OUTPUT/report.md and results.json."""
    t0 = time.perf_counter()
    batch_source.check_options(cfg)
    if not cfg.on_policy > 0 or cfg.seq_kd:
        raise ValueError(f"--preset {preset} compares off-policy with on-policy KD: it needs "
                         "--on-policy LAMBDA > 0 and no --seq-kd")
    world = distributed.init(cfg.device)
    if world.size > 1:
        raise ValueError(f"--preset {preset} is a single-process comparison; run it without "
                         "torchrun")
    choice = threads.choose(cfg.threads, 1)
    torch.set_num_threads(choice.threads)
    print(f"kdk distill: torch threads {choice.reason}", file=sys.stderr)
    out = Path(cfg.output)
    fingerprint = {**cfg.fingerprint(), "preset": preset}
    prepare_output(out, overwrite=overwrite, resume=resume, world=world,
                   fingerprint=fingerprint)
    data = training_data.prepare(cfg, None, None, world)
    tok = data.tok
    held = windows.eval_batches(data.held, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    teacher, teacher_summary = embedded_teacher.load_or_train(cfg, data, held, out, world, "ddp")
    results: dict[str, dict[str, Any]] = {"teacher": teacher_summary}
    torch.manual_seed(cfg.seed)
    student0 = init if init is not None else tiny_llama.build_llama(
        cfg.student_size, len(tok), cfg.seq_len, eos_id=tok.eos_token_id)
    prompt_len, new = batch_source.lengths(cfg)
    sampling = generation.Sampling(new, cfg.gen_temperature, cfg.gen_top_p)
    score = dict(heldout=held, sampling=sampling, prompt_len=prompt_len, seed=cfg.seed,
                 eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, device=world.device,
                 bf16=cfg.bf16)
    t_eval = time.perf_counter()
    results["teacher"].update(teacher_nll_of_samples(teacher, teacher, **score))
    eval_s = time.perf_counter() - t_eval
    for name, scfg in students(cfg) if variants is None else variants:
        student = copy.deepcopy(student0)
        stage = _stage(name, scfg, student, teacher, tok, out, fingerprint, resume)
        results[name] = train(stage, scfg, data.train, held, world)
        results[name].update(dir=str(out / name), divergence=scfg.divergence,
                             on_policy=scfg.on_policy)
        if results[name]["interrupted"]:
            break
        t_eval = time.perf_counter()
        results[name].update(teacher_nll_of_samples(student, teacher, **score))
        eval_s += time.perf_counter() - t_eval
    context = {"preset": preset, "corpus": data.summary, "seed": cfg.seed,
               "on-policy": batch_source.describe(cfg),
               "sampling metric": f"{sum(len(b) for b in held)} held-out prompts of "
                                  f"{prompt_len} tokens, {new} new tokens at T = "
                                  f"{cfg.gen_temperature:g}, top-p {cfg.gen_top_p:g}, the "
                                  "same seeds for every model",
               "metric evaluation time (s)": f"{eval_s:.1f}",
               "total wall time (s)": f"{time.perf_counter() - t0:.1f}"}
    write_report(out, cfg, results, context)
    return results


def verdict(results: dict[str, dict[str, Any]]) -> str:
    """Whether on-policy KD beat the off-policy student with its own divergence (or the
    default one) on each metric."""
    on = results.get("on-policy", {})
    base_name = next((k for k in results if k.startswith("kd-")), "kd")
    base = results.get(base_name, {})
    if on.get("heldout_ce") is None or base.get("heldout_ce") is None:
        return "incomplete run"
    d_nll = base["teacher_nll"] - on["teacher_nll"]
    d_ce = base["heldout_ce"] - on["heldout_ce"]
    return (f"on-policy vs {base_name}: teacher NLL of own samples {d_nll:+.4f} nats/token, "
            f"held-out CE {d_ce:+.4f} nats/token (positive = on-policy better)")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_report(out: Path, cfg: TrainConfig, results: dict[str, dict[str, Any]],
                 context: dict[str, Any]) -> Path:
    lines = report.header("kdk distill --preset on-policy", context,
                          f"{_cpu_name()} ({platform.machine()})")
    lines += ["| model | divergence | LAMBDA | held-out CE | teacher NLL of own samples | "
              "mean completion tokens | wall s | train tokens/s | gen tokens/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ce = r.get("heldout_ce")
        nll = r.get("teacher_nll")
        if r.get("cached"):
            name += " (cached; its training wall time)"
        lines.append(
            f"| {name} | {r.get('divergence', '—')} | {r.get('on_policy', '—')} | "
            f"{'—' if ce is None else f'{ce:.4f}'} | {'—' if nll is None else f'{nll:.4f}'} | "
            f"{r.get('completion_len', 0):.1f} | {r.get('wall_s', 0):.1f} | "
            f"{r.get('train_tokens_per_s', r.get('tokens_per_s', 0)):,.0f} | "
            f"{r.get('gen_tokens_per_s', 0):,.0f} |")
    lines += report.generation_lines(results)
    lines += ["", f"**{verdict(results)}.**", "", "Configuration:", "", "```",
              *(f"{k} = {v}" for k, v in report.run_settings(
                  cfg.to_dict(), kind=EMBEDDED, student=False, data=False, topk=False).items()),
              "```", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "evals"} for k, v in results.items()}
    checkpoint.write_json(out / "results.json", {"results": summary,
                                                 "verdict": verdict(results)})
    metrics.plot_loss_curves({k: Path(v["dir"]) / "metrics.jsonl" for k, v in results.items()
                              if v.get("dir")}, out / "report.png", "on-policy preset")
    print(md.read_text())
    return md


def load(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "results.json").read_text())
