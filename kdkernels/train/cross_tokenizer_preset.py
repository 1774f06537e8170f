"""`kdk distill --preset cross-tokenizer`: distillation across tokenizers on the embedded models.

The teacher is the embedded default's (its corpus, its 8192-token BPE, its cached weights: the
teacher is trained, once, with the default's batch, warm-up and window length whatever the
students use). The student gets its OWN byte-level BPE, trained on the spot on the same
training files with another vocabulary size (6000; cached under the kdkernels cache like the
teacher's), so the two tokenize the same text into different tokens. Students, from one
initialisation, on the same character windows (batches/text_windows.py):

- ``ce``: CE only (the student's tokens of the windows);
- ``uld``: ULD (sorted L1) + CE, ``kdkernels.fused_linear_uld_loss`` from both hidden states;
- ``hybrid``: GOLD's hybrid (generalized JSD on the token strings both vocabularies share,
  sorted L1 on the rest) + CE.

Held-out quality is in bits per byte (runtime/bits_per_byte.py says why), for the teacher on
its own tokenization of the same held-out windows too. ``cross-tokenizer-smoke`` is the same on
the smoke preset's teacher and corpus, with a 400-token student BPE (one minute).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import report
from .batches import windows
from .config import TrainConfig
from .config import preset as preset_config
from .objectives import cross_tokenizer
from .objectives.from_config import distill_objective
from .runtime import bits_per_byte, checkpoint, distributed, metrics, threads
from .runtime.loop import Stage, train
from .runtime.run_dir import prepare_output
from .sources import cross_pair, embedded_teacher, tiny_llama, tokenizer, training_data
from .sources.local_cache import cache_root, content_key
from .sources.run_inputs import CROSS
from .sources.stdlib_corpus import stdlib_corpus

PRESET_NAMES = ("cross-tokenizer", "cross-tokenizer-smoke")
# The student's own BPE: a vocabulary size other than the teacher's (8192; smoke 512).
STUDENT_VOCAB = {"cross-tokenizer": 6000, "cross-tokenizer-smoke": 400}
# The embedded preset whose teacher (and its cache) this one distils from.
TEACHER_PRESET = {"cross-tokenizer": "default", "cross-tokenizer-smoke": "smoke"}
# Teacher options the students may set otherwise: the teacher's cache key includes them.
TEACHER_SCHEDULE = ("batch_size", "warmup_steps", "seq_len")
STUDENTS = ("ce", cross_tokenizer.ULD, cross_tokenizer.HYBRID)
LABELS = {"ce": "student, CE only", **cross_pair.LABELS}


def teacher_config(cfg: TrainConfig, preset: str) -> TrainConfig:
    """The configuration the teacher was (or is) trained with: the students' options, with
    the teacher preset's batch, warm-up and window length."""
    base = preset_config(TEACHER_PRESET[preset])
    return dataclasses.replace(cfg, **{k: getattr(base, k) for k in TEACHER_SCHEDULE})


def student_tokenizer(texts: list[str], vocab_size: int, data_key: str):
    """(the student's byte-level BPE, trained on the training files and cached by the data
    and the vocabulary size; whether it was in the cache)."""
    key = content_key({"data": data_key, "vocab": vocab_size, "kind": "student bpe"})
    where = cache_root() / f"student-tokenizer-{key}"
    cached = (where / "tokenizer.json").exists()
    return tokenizer.load_or_train(where, texts, vocab_size), cached


def students(cfg: TrainConfig) -> list[str]:
    """CE only and both losses; --cross-tokenizer X keeps CE only and X."""
    return [s for s in STUDENTS if cfg.cross_tokenizer in (None, s) or s == "ce"]


def run(cfg: TrainConfig, *, overwrite: bool = False, resume: bool = False,
        preset: str = "cross-tokenizer") -> dict[str, dict[str, Any]]:
    """Train the preset's students and write OUTPUT/report.md and results.json."""
    t0 = time.perf_counter()
    if preset not in PRESET_NAMES:
        raise ValueError(f"--preset must be one of {', '.join(PRESET_NAMES)} here; got "
                         f"{preset!r}")
    cross_pair.check_options(cfg)
    world = distributed.init(cfg.device)
    if world.size > 1:
        raise ValueError(f"--preset {preset} is a single-process comparison; run it without "
                         "torchrun")
    choice = threads.choose(cfg.threads, 1)
    torch.set_num_threads(choice.threads)
    print(f"kdk distill: torch threads {choice.reason}", file=sys.stderr)
    out = Path(cfg.output)
    vocab = STUDENT_VOCAB[preset]
    fingerprint = {**cfg.fingerprint(), "preset": preset, "student_vocab": vocab}
    prepare_output(out, overwrite=overwrite, resume=resume, world=world,
                   fingerprint=fingerprint)
    tcfg = teacher_config(cfg, preset)
    data = training_data.prepare(tcfg, None, None, world)
    t_held = windows.eval_batches(data.held, tcfg.batch_size, tcfg.seq_len, tcfg.eval_batches)
    t_build = time.perf_counter()
    teacher, t_summary = embedded_teacher.load_or_train(tcfg, data, t_held, out, world, "ddp")
    teacher_s = time.perf_counter() - t_build
    texts = stdlib_corpus(cfg.corpus_max_mb, cfg.heldout_fraction)
    t_tok = time.perf_counter()
    s_tok, tok_cached = student_tokenizer(texts.train, vocab, data.key)
    tok_s = time.perf_counter() - t_tok
    rows = teacher.get_output_embeddings().weight.shape[0]
    c = cross_pair.build(cfg, s_tok, data.tok, rows, [("", t) for t in texts.train],
                         [("", t) for t in texts.heldout], texts.source)
    results: dict[str, dict[str, Any]] = {
        "teacher": {**t_summary, **c.teacher_summary(teacher, world.device, cfg.bf16),
                    "steps": t_summary.get("steps", 0), "cached": bool(t_summary.get("cached"))}}
    torch.manual_seed(cfg.seed)
    student0 = tiny_llama.build_llama(cfg.student_size, len(s_tok), cfg.seq_len,
                                      eos_id=s_tok.eos_token_id)
    for name in students(cfg):
        student = copy.deepcopy(student0)
        if name == "ce":
            obj, teach = distill_objective(cfg, student, None), None
        else:
            obj = cross_tokenizer.from_config(cfg, student, teacher, name, c.vocab_map)
            teach = teacher
        stage = Stage(name, obj, teach, cfg.max_steps, cfg.lr, cfg.seed, out / name, s_tok,
                      resume=checkpoint.latest(out / name) if resume else None,
                      fingerprint={**fingerprint, "stage": name})
        results[name] = train(stage, cfg, c.windows, c.held.student, world)
        results[name].update(dir=str(out / name), label=LABELS[name])
        c.finish(results[name], name)
        if results[name]["interrupted"]:
            break
    context = {"preset": preset, "corpus": c.summary, "seed": cfg.seed,
               "tokenizers": f"teacher: the embedded {len(data.tok):,}-token BPE; student: "
                             f"its own {len(s_tok):,}-token BPE on the same training files "
                             f"({'cached' if tok_cached else 'trained now'}, {tok_s:.1f} s); "
                             f"{c.matched:,} teacher tokens ({c.matched / len(data.tok):.1%}) "
                             "are also student tokens",
               "losses": f"merge {c.merge}; kd_weight {cfg.kd_weight}, ce_weight "
                         f"{cfg.ce_weight}, T = {cfg.temperature}, hybrid beta {cfg.beta}",
               "teacher": ("cached" if t_summary.get("cached") else "trained now") +
                          f" ({teacher_s:.1f} s to load or train)",
               "total wall time (s)": f"{time.perf_counter() - t0:.1f}"}
    if any(r.get("interrupted") for r in results.values()):
        context["status"] = "INTERRUPTED (resume with --resume)"
    write_report(out, cfg, results, context, preset)
    return results


def verdict(results: dict[str, dict[str, Any]]) -> str:
    ce = results.get("ce", {}).get("bits_per_byte")
    parts = []
    for name in (cross_tokenizer.ULD, cross_tokenizer.HYBRID):
        bpb = results.get(name, {}).get("bits_per_byte")
        if ce is not None and bpb is not None:
            parts.append(f"{name} {ce - bpb:+.4f} bits/byte vs CE only "
                         f"({'better' if bpb < ce else 'NOT better'})")
    return "; ".join(parts) if parts else "incomplete run"


def write_report(out: Path, cfg: TrainConfig, results: dict[str, dict[str, Any]],
                 context: dict[str, Any], preset: str) -> Path:
    import platform

    lines = report.header(f"kdk distill --preset {preset}", context, platform.machine())
    lines += ["| model | vocabulary | params | steps | held-out bits per byte | held-out CE "
              "(nats per own token) | wall s | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        bpb, ce = r.get("bits_per_byte"), r.get("heldout_ce")
        vocab = "teacher" if name == "teacher" else "student"
        label = "teacher" + (" (cached)" if r.get("cached") else "") if name == "teacher" \
            else r.get("label", name)
        lines.append(f"| {label} | {vocab} | {r.get('params', 0) / 1e6:.2f}M | "
                     f"{r.get('steps', 0)} | {'—' if bpb is None else f'{bpb:.4f}'} | "
                     f"{'—' if ce is None else f'{ce:.4f}'} | {r.get('wall_s', 0):.1f} | "
                     f"{r.get('tokens_per_s', 0):,.0f} |")
    lines += ["", f"**{verdict(results)}.**", "",
              f"Why bits per byte: {bits_per_byte.WHY}.", "", "Configuration:", "", "```",
              *(f"{k} = {v}" for k, v in report.run_settings(
                  cfg.to_dict(), kind=CROSS, student=False, data=False, topk=False).items()),
              "```", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "evals"} for k, v in results.items()}
    checkpoint.write_json(out / "results.json", {"results": summary,
                                                 "verdict": verdict(results)})
    metrics.plot_loss_curves({k: Path(v["dir"]) / "metrics.jsonl" for k, v in results.items()
                              if v.get("dir") and k != "teacher"}, out / "report.png",
                             f"{preset} preset")
    print(md.read_text())
    return md
