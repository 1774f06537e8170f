"""`kdk distill` end to end: corpus -> tokenizer -> teacher -> students -> report.

Without --teacher this is the embedded default: the Python standard library as corpus, a
locally trained byte-level BPE, a small Llama teacher trained once and cached under
~/.cache/kdkernels, then a smaller student trained with dense KD, one from a top-K cache of
the teacher (written into the run directory), and one with CE only, all from the same
initial weights on the same batches. With --teacher/--student it distils Hugging Face
checkpoints instead; with --teacher-cache it trains from a teacher-logit cache, no teacher.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..hf import models
from . import (
    checkpoint,
    corpus,
    distributed,
    embedded_cache,
    hf_pair,
    metrics,
    on_policy,
    report,
    streams,
    threads,
    tiny_llama,
    tokenizer,
    user_data,
)
from .cache_data import CacheData, cache_identity, check_student
from .config import TrainConfig
from .loop import Stage, train
from .objective import DistillObjective, heldout_ce
from .topk_objective import TopKObjective, check_options

RUN_MARKER = "run.json"


def cache_root() -> Path:
    return Path(os.environ.get("KDKERNELS_CACHE", Path.home() / ".cache" / "kdkernels"))


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def prepare_output(out: Path, *, overwrite: bool, resume: bool, world: distributed.World,
                   fingerprint: dict[str, Any]) -> None:
    """Refuse to mix runs: an output dir holding another run needs --overwrite or --resume."""
    marker = out / RUN_MARKER
    if resume:
        if not marker.exists():
            raise ValueError(f"--resume: {out} holds no run ({RUN_MARKER} missing); pass the "
                             "--output of the run to continue")
        saved = json.loads(marker.read_text())["fingerprint"]
        keys = set(saved) | set(fingerprint)
        diff = sorted(k for k in keys if saved.get(k) != fingerprint.get(k))
        if diff:
            detail = ", ".join(f"{k}: run {saved.get(k)!r} vs now {fingerprint.get(k)!r}"
                               for k in diff[:6])
            raise ValueError(f"--resume {out} was written by a different configuration "
                             f"({detail}); resume with the same options")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            what = "another kdk run" if marker.exists() else "other files"
            raise ValueError(f"--output {out} already holds {what}; pass --overwrite to "
                             "replace it, --resume to continue it, or another --output")
        if world.is_main:
            shutil.rmtree(out)
    world.barrier()
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(marker, {"fingerprint": fingerprint, "argv": sys.argv})
    world.barrier()


def _tokens(tok, texts: list[str], cache: Path | None, name: str) -> torch.Tensor:
    path = None if cache is None else cache / f"{name}-tokens.pt"
    if path is not None and path.exists():
        return torch.load(path)
    ids = corpus.encode(tok, texts, tok.eos_token_id)
    if path is not None:
        torch.save(ids, path)
    return ids


def _data(cfg: TrainConfig, data: str | None, tok, world: distributed.World):
    """Tokenizer (trained and cached when none is given), token streams, the data's cache
    key, and what they came from (.summary() for the report)."""
    if data:
        d = user_data.prepare(cfg, data, tok, world, cache_root())
        return d.tok, d.train, d.held, d.key, d
    texts = corpus.stdlib_corpus(cfg.corpus_max_mb, cfg.heldout_fraction)
    key = _key({"source": texts.source, "python": sys.version, "mb": cfg.corpus_max_mb,
                "heldout": cfg.heldout_fraction, "vocab": cfg.vocab_size,
                "tok": None if tok is None else tok.name_or_path})
    cache = cache_root() / f"data-{key}"
    if world.is_main:  # rank 0 trains/encodes once; the others read its cache
        cache.mkdir(parents=True, exist_ok=True)
        first = tok if tok is not None else tokenizer.load_or_train(cache, texts.train,
                                                                     cfg.vocab_size)
        _tokens(first, texts.train, cache, "train")
        _tokens(first, texts.heldout, cache, "heldout")
    world.barrier()
    if tok is None:
        tok = tokenizer.load_or_train(cache, texts.train, cfg.vocab_size)
    train_ids = _tokens(tok, texts.train, cache, "train")
    held_ids = _tokens(tok, texts.heldout, cache, "heldout")
    return tok, train_ids, held_ids, key, _StdlibSource(texts, train_ids, held_ids)


class _StdlibSource:
    """The embedded corpus described like user data: files and tokens on each side."""

    def __init__(self, texts: corpus.Corpus, train_ids: torch.Tensor, held_ids: torch.Tensor):
        self.texts, self.train_ids, self.held_ids = texts, train_ids, held_ids

    def summary(self) -> str:
        return user_data.describe(self.texts.source, len(self.texts.train),
                                  len(self.texts.heldout), self.train_ids, self.held_ids,
                                  unit="files")


def _objective(cfg: TrainConfig, student, teacher, baseline: str = "fused") -> DistillObjective:
    scale, softcap = (1.0, None) if teacher is None else models.logit_transform(teacher)
    return DistillObjective(student, divergence=cfg.divergence, beta=cfg.beta,
                            temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                            ce_weight=cfg.ce_weight, impl=cfg.impl, baseline=baseline,
                            teacher_softcap=softcap, teacher_logit_scale=scale)


def _teacher(cfg: TrainConfig, tok, train_ids, held, data_key: str, out: Path,
             world: distributed.World, parallel: str) -> tuple[torch.nn.Module, dict]:
    """The cached teacher for this data and config, or a freshly trained (and cached) one."""
    from transformers import AutoModelForCausalLM

    key = _key({"data": data_key, "size": cfg.teacher_size.as_dict(), "steps": cfg.teacher_steps,
                "lr": cfg.teacher_lr, "seq": cfg.seq_len, "batch": cfg.batch_size,
                "warmup": cfg.warmup_steps, "min_lr": cfg.min_lr_ratio, "vocab": len(tok),
                "bf16": cfg.bf16})
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
    stage = Stage("teacher", _objective(cfg, teacher, None), None, cfg.teacher_steps,
                  cfg.teacher_lr, 0, out / "teacher", tok,
                  fingerprint={"teacher_key": key})
    summary = train(stage, cfg, train_ids, held, world, parallel)
    summary["dir"] = str(out / "teacher")
    if world.is_main and not summary["interrupted"]:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        teacher.save_pretrained(str(tmp), state_dict=checkpoint.full_state_dict(teacher))
        tok.save_pretrained(str(tmp))
        (tmp / "summary.json").write_text(json.dumps({k: v for k, v in summary.items()
                                                      if k != "dir"}))
        tmp.rename(cached) if not cached.exists() else shutil.rmtree(tmp)
    return teacher.eval(), summary


def _stage_objective(cfg: TrainConfig, kind: str, student, teacher) -> torch.nn.Module:
    if kind == "topk":
        return TopKObjective(student, tail=cfg.tail, divergence=cfg.divergence, beta=cfg.beta,
                             temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                             ce_weight=cfg.ce_weight, impl=cfg.impl)
    return _objective(cfg, student, teacher, kind)


def _topk_refusal(cfg: TrainConfig) -> str | None:
    """Why the top-k loss cannot run this configuration (e.g. JSD under --tail zero)."""
    try:
        check_options(tail=cfg.tail, divergence=cfg.divergence, beta=cfg.beta,
                      temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                      ce_weight=cfg.ce_weight, impl=cfg.impl)
    except ValueError as err:
        return str(err)
    return None


def cache_seq_len(path: str) -> int:
    """The sequence length of the cache at path (the default --seq-len with a cache)."""
    from ..cache import read_manifest

    return int(read_manifest(Path(path))["seq_len"])


def _cache_inputs(cfg: TrainConfig, cache_path: str, student_path: str | None,
                  data: str | None, world: distributed.World):
    """--teacher-cache: the student (--student, or the embedded one on the embedded
    tokenizer), its tokenizer, the cache's batches, held-out windows and their source.
    Held-out text: --data's held-out files; else the embedded corpus's held-out files for
    the embedded student; else the cache's last heldout_fraction of sequences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = None
    if student_path is None:
        tok, _, held_ids, _, texts = _data(cfg, None, None, world)
        torch.manual_seed(cfg.seed)
        student0 = tiny_llama.build_llama(cfg.student_size, len(tok), cfg.seq_len,
                                      eos_id=tok.eos_token_id)
        name = "the embedded default student (no --student)"
    else:
        torch.manual_seed(cfg.seed)
        student0 = AutoModelForCausalLM.from_pretrained(student_path)
        try:
            tok = AutoTokenizer.from_pretrained(student_path)
        except (OSError, ValueError):
            tok = None  # refused by check_student: a cache is only paired through tokenizers
        name = f"--student {student_path}"
    own_heldout = student_path is not None and data is None
    cache = CacheData.open(cache_path, heldout_fraction=cfg.heldout_fraction if own_heldout
                           else 0.0)
    check_student(cache.cache, student0, tok, name)
    cache.check_seq_len(cfg.seq_len)
    if data is not None:
        _, _, held_ids, _, texts = _data(cfg, data, tok, world)
    if texts is not None:
        held = streams.eval_batches(held_ids, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        source = f"held-out from {texts.summary()}; training tokens from the teacher cache"
    else:
        held = cache.heldout_batches(cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        source = (f"teacher cache {cache_path}: {len(cache.train)} training / "
                  f"{len(cache.held)} held-out sequences (the last ones)")
    return student0, tok, cache, held, source


def _cache_facts(data: CacheData) -> dict[str, Any]:
    m = data.cache.manifest
    size = embedded_cache.disk_bytes(Path(data.cache.path))
    tokens = int(m["num_tokens"])
    return {"top_k": int(m["top_k"]), "dtype": m["dtype"], "sequences": int(m["num_sequences"]),
            "tokens": tokens, "bytes": size, "bytes_per_token": size / max(tokens, 1),
            "write_s": None, "dir": str(data.cache.path), "teacher": m.get("teacher")}


def run(cfg: TrainConfig, *, teacher_path: str | None = None, student_path: str | None = None,
        data: str | None = None, teacher_cache: str | None = None, overwrite: bool = False,
        resume: bool = False, parallel: str = "ddp", compare_ce: bool | None = None,
        preset: str = "default") -> dict:
    """The whole `kdk distill`; returns the per-model summaries (rank 0 writes the report)."""
    t0 = time.perf_counter()
    if teacher_cache is not None and teacher_path is not None:
        raise ValueError("--teacher-cache replaces --teacher (the cache holds the teacher's "
                         "top-K log-probs); pass one of them")
    on_policy.check_options(cfg)
    if teacher_cache is not None and on_policy.enabled(cfg):
        raise ValueError("--on-policy/--seq-kd score generated completions with a teacher "
                         "model; a --teacher-cache run has none (drop --teacher-cache or them)")
    world = distributed.init(cfg.device)
    notes: dict[str, str] = {}
    if world.device.type == "cpu":
        choice = threads.choose(cfg.threads, world.size)
        torch.set_num_threads(choice.threads)
        notes["torch threads"] = choice.reason
        if world.is_main:
            print(f"kdk distill: torch threads {choice.reason}", file=sys.stderr)
    out = Path(cfg.output)
    fingerprint = {**cfg.fingerprint(), "teacher": teacher_path, "student": student_path,
                   "data": data, "world": world.size, "parallel": parallel}
    if teacher_cache is not None:
        from ..cache import read_manifest

        fingerprint["teacher_cache"] = cache_identity(teacher_cache,
                                                      read_manifest(Path(teacher_cache)))
    prepare_output(out, overwrite=overwrite, resume=resume, world=world, fingerprint=fingerprint)
    results: dict[str, dict] = {}
    topk_data = teacher = None
    if teacher_cache is not None:
        refusal = _topk_refusal(cfg)
        if refusal:
            raise ValueError(refusal)
        if cfg.baseline == "naive":
            raise ValueError("--baseline naive compares the fused dense loss with materialised "
                             "teacher logits; a --teacher-cache run has no teacher model")
        student0, tok, topk_data, held, source = _cache_inputs(cfg, teacher_cache,
                                                               student_path, data, world)
        train_ids = topk_data  # the CE student (if any) reads the same cached sequences
        compare_ce = (student_path is None) if compare_ce is None else compare_ce
    elif teacher_path is None:
        if student_path is not None:
            raise ValueError("--student needs --teacher or --teacher-cache (the embedded "
                             "default builds both)")
        tok, train_ids, held_ids, data_key, texts = _data(cfg, data, None, world)
        held = streams.eval_batches(held_ids, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        teacher, results["teacher"] = _teacher(cfg, tok, train_ids, held, data_key, out, world,
                                               parallel)
        torch.manual_seed(cfg.seed)
        student0 = tiny_llama.build_llama(cfg.student_size, len(tok), cfg.seq_len,
                                      eos_id=tok.eos_token_id)
        compare_ce = True if compare_ce is None else compare_ce
        source = _source(texts)
    else:
        if student_path is None:
            raise ValueError("--teacher needs --student (a Hugging Face checkpoint to train)")
        torch.manual_seed(cfg.seed)
        pair = hf_pair.load(teacher_path, student_path, dtype=cfg.teacher_dtype,
                            device=world.device)
        teacher, student0 = pair.teacher, pair.student
        tok, train_ids, held_ids, data_key, texts = _data(cfg, data, pair.tok, world)
        held = streams.eval_batches(held_ids, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        results["teacher"] = {"heldout_ce": heldout_ce(teacher, held, world.device, cfg.bf16),
                              "params": sum(p.numel() for p in teacher.parameters()),
                              "steps": 0, "cached": False}
        compare_ce = False if compare_ce is None else compare_ce
        source = _source(texts)
    models.check_seq_len(student0, cfg.seq_len, "student")
    if teacher is not None:
        models.check_seq_len(teacher, cfg.seq_len, "teacher")
    # (name, teacher model, objective kind, training data)
    stages: list[tuple[str, Any, str, Any]] = []
    if topk_data is not None:
        stages.append(("topk", None, "topk", topk_data))
    else:
        stages.append(("kd", teacher, "fused", train_ids))
        embedded = teacher_path is None and cfg.cache_top_k > 0
        refusal = _topk_refusal(cfg) if embedded else None
        if embedded and isinstance(train_ids, streams.TokenStream):
            refusal = "prompt/completion data: the top-k cache holds no prompt mask"
        if refusal:
            notes["top-k student"] = f"skipped: {refusal}"
        elif embedded:
            stages.append(("topk", teacher, "topk", None))  # cache written just before it
    if compare_ce:
        stages.append(("ce", None, "fused", train_ids))
    if cfg.baseline == "naive" and teacher is not None:
        stages.append(("naive", teacher, "naive", train_ids))
    for name, t, kind, stage_data in stages:
        info = None
        if kind == "topk":
            if stage_data is None:
                stage_data, info = embedded_cache.build(cfg, t, tok, train_ids, out, world)
            else:
                info = _cache_facts(stage_data)
            t = None  # a top-k student never runs a teacher
        student = copy.deepcopy(student0)  # identical initial weights for every student
        stage = Stage(name, _stage_objective(cfg, kind, student, t), t, cfg.max_steps, cfg.lr,
                      cfg.seed, out / name, tok,
                      resume=checkpoint.latest(out / name) if resume else None,
                      fingerprint={**fingerprint, "stage": name},
                      generation=_generation(cfg, tok, t, world, parallel, notes))
        results[name] = train(stage, cfg, stage_data, held, world, parallel)
        results[name]["dir"] = str(out / name)
        if info is not None:
            results[name]["cache"] = info
        if results[name]["interrupted"]:
            print(f"\ninterrupted: checkpoint saved under {out / name / 'checkpoints'}; "
                  f"continue with the same command plus --resume", file=sys.stderr)
            break
    if world.is_main:
        _finish(out, cfg, results, source, t0, preset, world, notes)
    return results


def _generation(cfg: TrainConfig, tok, teacher, world: distributed.World, parallel: str,
                notes: dict[str, str]) -> on_policy.OnPolicy | None:
    """The on-policy / seq-KD batch source of a student distilled from a teacher model (the
    CE-only student has no teacher to score completions and stays on the dataset)."""
    if teacher is None or not on_policy.enabled(cfg):
        return None
    from . import prompts

    notes["on-policy"] = on_policy.describe(cfg)
    loaded = prompts.load(cfg.prompts, tok) if cfg.prompts else None
    return on_policy.OnPolicy(cfg, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                              prompts=loaded, synced=parallel == "fsdp" and world.size > 1)


def _source(texts) -> str:
    return texts.summary()


def _loss_agreement(out: Path) -> dict[str, float]:
    fused = {r["step"]: r["loss"] for r in metrics.read(out / "kd" / "metrics.jsonl")
             if "loss" in r}
    naive = {r["step"]: r["loss"] for r in metrics.read(out / "naive" / "metrics.jsonl")
             if "loss" in r}
    both = sorted(set(fused) & set(naive))
    if not both:
        return {}
    diffs = [abs(fused[s] - naive[s]) / max(abs(naive[s]), 1e-12) for s in both]
    return {"step-1 loss relative difference (fused vs naive)": f"{diffs[0]:.2e}",
            "max relative training-loss difference over all steps": f"{max(diffs):.2e}"}


def _finish(out: Path, cfg: TrainConfig, results: dict, source: str, t0: float, preset: str,
            world: distributed.World, notes: dict[str, str]) -> None:
    context = {"preset": preset, "corpus": source, "seed": cfg.seed,
               "world size": world.size, "device": str(world.device),
               "total wall time (s)": f"{time.perf_counter() - t0:.1f}", **notes}
    if "naive" in results:
        context.update(_loss_agreement(out))
    if any(r.get("interrupted") for r in results.values()):
        context["status"] = "INTERRUPTED (resume with --resume)"
    md = report.write(out, results, cfg.to_dict(), context)
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "evals"} for k, v in results.items()}
    checkpoint.write_json(out / "results.json", {"results": summary,
                                                 "kd_benefit": report.kd_benefit(results),
                                                 "topk": report.topk_benefit(results)})
    print(md.read_text())
