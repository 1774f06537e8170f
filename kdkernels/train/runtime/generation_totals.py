"""What generation costs next to training in a run with generated micro-batches: the
seconds and kept completion tokens of each step (StepGeneration, filled by the batch
source) and their totals and rates over the run and all ranks (GenerationTotals, kept by
the loop)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed


@dataclass
class StepGeneration:
    """What generation cost in one optimizer step (this rank)."""

    seconds: float = 0.0
    tokens: int = 0  # kept completion tokens (up to and including EOS)
    batches: int = 0  # micro-batches replaced


class GenerationTotals:
    """Generation vs training time and tokens of a run with generated micro-batches, over
    all ranks: generation tokens are kept completion tokens, training tokens every token the
    two models ran forward (and the student backward) on."""

    def __init__(self) -> None:
        self.gen_s = self.train_s = 0.0
        self.gen_tokens = self.train_tokens = self.batches = 0
        self._gen_rate = self._train_rate = 0.0

    def add(self, step: StepGeneration, micro: list[dict[str, torch.Tensor]], dt: float,
            world: distributed.World) -> dict[str, float]:
        gen_tokens = int(world.sum(float(step.tokens)))
        train_tokens = int(world.sum(float(sum(b["input_ids"].numel() for b in micro))))
        gen_s = world.sum(step.seconds) / world.size  # ranks generate in parallel
        train_s = max(dt - gen_s, 1e-9)
        self.gen_s += gen_s
        self.train_s += train_s
        self.gen_tokens += gen_tokens
        self.train_tokens += train_tokens
        batches = int(world.sum(float(step.batches)))
        self.batches += batches
        train_rate = train_tokens / train_s
        self._train_rate = train_rate if not self._train_rate else \
            0.9 * self._train_rate + 0.1 * train_rate
        if gen_s > 0:
            rate = gen_tokens / gen_s
            self._gen_rate = rate if not self._gen_rate else 0.9 * self._gen_rate + 0.1 * rate
        return {"gen_s": gen_s, "gen_tokens": gen_tokens,
                "gen_tokens_per_s": gen_tokens / gen_s if gen_s > 0 else 0.0,
                "train_s": train_s, "train_tokens": train_tokens,
                "train_tokens_per_s": train_rate, "generated_batches": batches}

    def postfix(self) -> dict[str, str]:
        return {"gen_tok_s": f"{self._gen_rate:,.0f}", "train_tok_s": f"{self._train_rate:,.0f}"}

    def summary(self, wall: float) -> dict[str, float]:
        return {"gen_s": self.gen_s, "gen_tokens": self.gen_tokens,
                "gen_tokens_per_s": self.gen_tokens / self.gen_s if self.gen_s > 0 else 0.0,
                "train_s": self.train_s, "train_tokens": self.train_tokens,
                "train_tokens_per_s": self.train_tokens / self.train_s if self.train_s else 0.0,
                "generated_batches": self.batches, "tokens": self.train_tokens,
                "tokens_per_s": self.train_tokens / wall if wall > 0 else 0.0}
