"""The training loop: micro-batches with num_items normalisation, warm-up + cosine, bf16
autocast, held-out evaluation, JSONL metrics, checkpoints, and Ctrl-C that saves."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, corpus, distributed, metrics, objective, streams
from .cache_data import CacheData
from .config import TrainConfig
from .memory import PeakMemory


@dataclass
class Stage:
    """One model being trained: a teacher on CE, or a student with or without KD."""

    name: str
    objective: nn.Module  # DistillObjective or TopKObjective: targets() + forward()
    teacher: nn.Module | None
    steps: int
    lr: float
    seed: int
    out_dir: Path
    tokenizer: Any = None
    resume: Path | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)


class _StopOnSigint:
    """The first Ctrl-C asks the loop to save and stop after the current step; a second one
    interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopOnSigint:
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float,
                    world: distributed.World) -> float:
    """Global grad norm over plain and FSDP-sharded (DTensor) gradients, then clipping."""
    sq_local, sq_repl = 0.0, 0.0
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        if hasattr(g, "to_local"):
            sq_local += float(g.to_local().float().pow(2).sum())
        else:
            sq_repl += float(g.float().pow(2).sum())
    sharded = any(hasattr(p, "to_local") for p in params)
    total = (world.sum(sq_local) if sharded else 0.0) + sq_repl
    norm = total ** 0.5
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def _sync_replicated_grads(params: list[nn.Parameter], world: distributed.World) -> None:
    """Under FSDP2 only the decoder layers are sharded; average the rest by hand."""
    for p in params:
        if p.grad is not None and not hasattr(p.grad, "to_local"):
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world.size)


def _batch(data: torch.Tensor | streams.TokenStream | CacheData, cfg: TrainConfig, seed: int,
           step: int, micro: int, world: distributed.World) -> dict[str, torch.Tensor]:
    """One micro-batch on the device: windows of a token stream (with labels when it masks
    prompts), or of a teacher cache (with the cached teacher tensors); a pure function of
    (seed, step, micro, rank)."""
    if isinstance(data, CacheData):
        b = data.train_batch(cfg.batch_size, cfg.seq_len, seed=seed, step=step, micro=micro,
                             rank=world.rank, grad_accum=cfg.grad_accum, world_size=world.size)
    elif isinstance(data, streams.TokenStream):
        b = streams.train_batch(data, cfg.batch_size, cfg.seq_len, seed=seed, step=step,
                                micro=micro, rank=world.rank)
    else:
        b = {"input_ids": corpus.train_batch(data, cfg.batch_size, cfg.seq_len, seed=seed,
                                             step=step, micro=micro, rank=world.rank)}
    return {k: v.to(world.device) for k, v in b.items()}


def _kept(b: dict[str, torch.Tensor]) -> int:
    """Labels that reach the loss: every next token, or the unmasked ones."""
    if "labels" in b:
        return int((b["labels"] != streams.IGNORE_INDEX).sum())
    return int((b["input_ids"][:, 1:] >= 0).sum())


def train(stage: Stage, cfg: TrainConfig, tokens: torch.Tensor | streams.TokenStream | CacheData,
          heldout: list, world: distributed.World,
          parallel: str = "ddp") -> dict[str, Any]:
    """Train stage.objective's student on a token stream or a teacher cache; returns a
    summary (held-out CE, time, memory...)."""
    device = world.device
    obj = stage.objective.to(device)
    student = obj.student
    torch.manual_seed(stage.seed)
    start_step, saved = 0, None
    if stage.resume is not None:
        saved = checkpoint.check_fingerprint(stage.resume, stage.fingerprint)
        checkpoint.load_model_weights(stage.resume, student)
        start_step = saved["step"]
    student.train()
    model = distributed.wrap(obj, world, parallel)
    fsdp = parallel == "fsdp" and world.size > 1
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.95))
    from .schedule import warmup_cosine

    scheduler = warmup_cosine(optimizer, min(cfg.warmup_steps, stage.steps), stage.steps,
                              cfg.min_lr_ratio)
    if saved is not None:
        checkpoint.load_rank_state(stage.resume, world.rank, optimizer)
        scheduler.load_state_dict(saved["scheduler"])
    log = metrics.JsonlLog(stage.out_dir / "metrics.jsonl",
                           start_step if saved is not None else None, world.is_main)
    teacher = stage.teacher.to(device).eval() if stage.teacher is not None else None
    bf16 = cfg.bf16
    step_tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world.size

    def save(step: int) -> Path:
        return checkpoint.save(stage.out_dir / "checkpoints" / f"step-{step:06d}", student,
                               stage.tokenizer, optimizer, scheduler, step=step,
                               fingerprint=stage.fingerprint, rank=world.rank)

    def evaluate(step: int) -> float:
        ce = objective.heldout_ce(student, heldout, device, bf16)
        log.write({"step": step, "eval_ce": ce})
        return ce

    bar = None
    if cfg.progress and world.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=stage.steps, initial=start_step, desc=stage.name, unit="step",
                   dynamic_ncols=True)
    evals: list[tuple[int, float]] = []
    interrupted = False
    t_start = time.perf_counter()
    tok_rate = 0.0
    with PeakMemory(device) as mem, _StopOnSigint() as stop:
        for step in range(start_step, stage.steps):
            t0 = time.perf_counter()
            micro = [_batch(tokens, cfg, stage.seed, step, m, world) for m in range(cfg.grad_accum)]
            # Every kept token of the whole step (all micro-batches, all ranks) counts once;
            # DDP averages gradients over ranks, hence the division by world size.
            kept = world.sum(float(sum(_kept(b) for b in micro)))
            num_items = kept / world.size
            loss_sum = kd_sum = ce_sum = 0.0
            for m, b in enumerate(micro):
                last = m == len(micro) - 1
                sync = model.no_sync() if hasattr(model, "no_sync") and not last else \
                    contextlib.nullcontext()
                with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    ids = b["input_ids"]
                    th, tw = obj.targets(teacher, b)
                    # labels only for masked streams: the top-k objective takes none
                    extra = {"labels": b["labels"]} if "labels" in b else {}
                    out = model(ids, th, tw, num_items, **extra)
                    out.loss.backward()
                loss_sum += float(out.loss.detach())
                kd_sum += float(out.kd)
                ce_sum += float(out.ce)
            if fsdp:
                _sync_replicated_grads(params, world)
            gnorm = _clip_grad_norm(params, cfg.grad_clip, world)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            rate = step_tokens / dt
            tok_rate = rate if tok_rate == 0 else 0.9 * tok_rate + 0.1 * rate
            rec = {"step": step + 1, "loss": world.sum(loss_sum) / world.size,
                   "kd": world.sum(kd_sum) / world.size, "ce": world.sum(ce_sum) / world.size,
                   "lr": scheduler.get_last_lr()[0], "grad_norm": gnorm,
                   "tokens_per_s": step_tokens / dt, "peak_mem_mib": mem.peak_mib}
            log.write(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}", ce=f"{rec['ce']:.3f}",
                                tok_s=f"{tok_rate:,.0f}")
                bar.update(1)
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < stage.steps:
                evals.append((done, evaluate(done)))
            if stop.requested:
                save(done)
                interrupted = True
                break
            if cfg.save_every and done % cfg.save_every == 0 and done < stage.steps:
                save(done)
        wall = time.perf_counter() - t_start
        final_step = done if stage.steps > start_step else start_step
        if not interrupted:
            evals.append((final_step, evaluate(final_step)))
            save(final_step)
        peak = mem.peak_mib
    if bar is not None:
        bar.close()
    trained = final_step - start_step
    return {"name": stage.name, "steps": final_step, "heldout_ce": evals[-1][1] if evals else None,
            "evals": evals, "wall_s": wall, "tokens": trained * step_tokens,
            "tokens_per_s": trained * step_tokens / wall if wall > 0 else 0.0,
            "peak_mem_mib": peak, "interrupted": interrupted,
            "params": sum(p.numel() for p in student.parameters())}
