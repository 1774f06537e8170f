"""On-policy (GKD) and sequence-level KD micro-batches for the training loop.

Per micro-batch a seeded coin decides where its completions come from: with probability
--on-policy LAMBDA the student samples them (on-policy KD, GKD's lambda); otherwise, with
--seq-kd the teacher samples them (sequence-level KD, TRL's seq_kd), else the dataset batch is
kept as it is. So --seq-kd with --on-policy LAMBDA is TRL's GKDTrainer with seq_kd=True: the
student's samples with probability LAMBDA, the teacher's otherwise; --seq-kd alone is every
micro-batch from the teacher. The prompt is the first --prompt-len tokens of the dataset
window, or a --prompts record.

The coin is keyed by (seed, step, micro-batch) and not by rank, so every rank of a DDP/FSDP
world generates in the same micro-batches (FSDP's synced generation needs that); samples are
keyed by rank as well. Nothing is drawn from the trainer's RNG: --on-policy 0 without --seq-kd
never enters this module.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ...hf import models
from ..batches import completions
from ..config import TrainConfig
from ..runtime.generation_totals import StepGeneration
from . import generation


def enabled(cfg: TrainConfig) -> bool:
    return cfg.on_policy > 0 or cfg.seq_kd


def lengths(cfg: TrainConfig) -> tuple[int, int]:
    """(prompt length, new tokens): --prompt-len defaults to half of --seq-len, and
    --max-new-tokens to the rest of it."""
    prompt = cfg.seq_len // 2 if cfg.prompt_len is None else cfg.prompt_len
    new = cfg.seq_len - prompt if cfg.max_new_tokens is None else cfg.max_new_tokens
    return prompt, new


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_options(cfg: TrainConfig) -> None:
    """Refuse bad on-policy options, naming the option (checked whether or not they are on,
    so that a typo never waits for the run that needs it)."""
    lam = cfg.on_policy
    if not _is_number(lam) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"--on-policy must be a probability in [0, 1]; got {lam!r}")
    if cfg.prompt_len is not None:
        if isinstance(cfg.prompt_len, bool) or not isinstance(cfg.prompt_len, int) \
                or cfg.prompt_len < 1:
            raise ValueError(f"--prompt-len must be a positive integer; got {cfg.prompt_len!r}")
        if cfg.prompt_len >= cfg.seq_len:
            raise ValueError(f"--prompt-len {cfg.prompt_len} must be shorter than --seq-len "
                             f"{cfg.seq_len} (a prompt is the start of a training window)")
    if cfg.max_new_tokens is not None and (isinstance(cfg.max_new_tokens, bool)
                                           or not isinstance(cfg.max_new_tokens, int)
                                           or cfg.max_new_tokens <= 0):
        raise ValueError(f"--max-new-tokens must be a positive integer; got "
                         f"{cfg.max_new_tokens!r}")
    if not _is_number(cfg.gen_temperature) or cfg.gen_temperature <= 0:
        raise ValueError(f"--gen-temperature must be > 0; got {cfg.gen_temperature!r}")
    if not _is_number(cfg.gen_top_p) or not 0.0 < cfg.gen_top_p <= 1.0:
        raise ValueError(f"--gen-top-p must be in (0, 1]; got {cfg.gen_top_p!r}")
    if cfg.prompts is not None and not enabled(cfg):
        raise ValueError("--prompts is only read by on-policy or sequence-level KD; pass "
                         "--on-policy LAMBDA > 0 or --seq-kd with it")


def describe(cfg: TrainConfig) -> str:
    """One line for the report: who generates, how often, and how."""
    prompt, new = lengths(cfg)
    who = []
    if cfg.on_policy > 0:
        who.append(f"student-generated with probability {cfg.on_policy:g}")
    if cfg.seq_kd:
        who.append("teacher-generated " + ("otherwise" if cfg.on_policy > 0 else "always"))
    source = f"--prompts {cfg.prompts}" if cfg.prompts else f"the first {prompt} tokens"
    return (f"micro-batches {' and '.join(who)}; prompts {source}, {new} new tokens at "
            f"T = {cfg.gen_temperature:g}, top-p {cfg.gen_top_p:g} (teacher-distilled "
            "students only)")


class OnPolicy:
    """Replaces micro-batches by generated ones; one per training stage."""

    def __init__(self, cfg: TrainConfig, *, eos_id: int | None, pad_id: int | None,
                 prompts: list[list[int]] | None = None, synced: bool = False) -> None:
        check_options(cfg)
        if not enabled(cfg):
            raise ValueError("OnPolicy needs --on-policy LAMBDA > 0 or --seq-kd")
        self.lam = float(cfg.on_policy)
        self.seq_kd = bool(cfg.seq_kd)
        self.prompt_len, new = lengths(cfg)
        self.sampling = generation.Sampling(new, cfg.gen_temperature, cfg.gen_top_p)
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.prompts = prompts
        self.bf16 = cfg.bf16
        self.synced = synced

    def total_len(self) -> int:
        width = self.prompt_len if self.prompts is None else \
            min(self.prompt_len, max(len(p) for p in self.prompts))
        return width + self.sampling.max_new_tokens

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise ValueError("--on-policy/--seq-kd need a teacher model (a --teacher-cache or "
                             "CE-only student has none to score the completions)")
        total = self.total_len()
        for name, m in (("student", student), ("teacher", teacher)):
            limit = models.max_positions(m)
            if limit is not None and total > limit:
                raise ValueError(f"prompt + --max-new-tokens = {total} tokens exceeds the "
                                 f"{name}'s max_position_embeddings={limit}; lower "
                                 "--max-new-tokens or --prompt-len")

    def source(self, seed: int, step: int, micro: int) -> str | None:
        """'student', 'teacher' or None (keep the dataset batch) for this micro-batch."""
        g = torch.Generator().manual_seed(generation.key_seed("on-policy coin", seed, step,
                                                              micro))
        if float(torch.rand((), generator=g)) < self.lam:
            return "student"
        return "teacher" if self.seq_kd else None

    def _prompts(self, batch: dict[str, torch.Tensor], seed: int, step: int, micro: int,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]
        if self.prompts is None:
            p = ids[:, :self.prompt_len]
            return p, torch.ones_like(p)
        g = torch.Generator().manual_seed(generation.key_seed("prompts", seed, step, micro,
                                                              rank))
        pick = torch.randint(len(self.prompts), (ids.shape[0],), generator=g).tolist()
        # The end of a long prompt is kept: it is what the completion continues.
        chosen = [self.prompts[i][-self.prompt_len:] for i in pick]
        p, mask = completions.left_pad(chosen, self.pad_id)
        return p.to(ids.device), mask.to(ids.device)

    def replace(self, batches: list[dict[str, torch.Tensor]], *, seed: int, step: int,
                rank: int, student: nn.Module, teacher: nn.Module | None
                ) -> tuple[list[dict[str, torch.Tensor]], StepGeneration]:
        """The step's micro-batches with the coin's picks regenerated, and their cost."""
        stats = StepGeneration()
        out = []
        for micro, batch in enumerate(batches):
            who = self.source(seed, step, micro)
            if who is None:
                out.append(batch)
                continue
            t0 = time.perf_counter()
            prompt, mask = self._prompts(batch, seed, step, micro, rank)
            model = student if who == "student" else teacher
            new = generation.generate_batch(
                model, prompt, mask, self.sampling,
                seed=generation.key_seed("on-policy sample", seed, step, micro, rank),
                eos_id=self.eos_id, pad_id=self.pad_id, bf16=self.bf16, synced=self.synced)
            stats.seconds += time.perf_counter() - t0
            stats.tokens += int(completions.kept_tokens(new))
            stats.batches += 1
            out.append(new)
        return out, stats
