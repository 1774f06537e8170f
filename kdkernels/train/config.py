"""Run configuration: one dataclass for every trainer option, and the named presets.

The loss options are not listed here: TrainConfig takes every KDOptions field except the
ones the trainer sets itself (SET_BY_THE_TRAINER), so a new loss option becomes a trainer
option, part of the fingerprint and of the objectives' options with no edit here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..options import KDOptions

# KDOptions fields the trainer fills in itself: the logit transforms are read from the
# models, the ignore index is the one the label masks write, reduction / num_items /
# return_components are the loop's normalisation, the chunking is the loss's own memory
# budget, and impl is --impl (a TrainConfig field of its own, outside the fingerprint).
SET_BY_THE_TRAINER = frozenset({
    "student_softcap", "teacher_softcap", "student_logit_scale", "teacher_logit_scale",
    "ignore_index", "reduction", "num_items", "return_components", "chunk_size",
    "max_workspace_bytes", "impl"})
# Where the trainer's default differs from the loss's: KD with a hard-label share.
TRAINER_DEFAULTS: dict[str, Any] = {"kd_weight": 0.8, "ce_weight": 0.2}


def _loss_field(f: dataclasses.Field) -> tuple[str, Any, dataclasses.Field]:
    if f.name in TRAINER_DEFAULTS:
        return f.name, f.type, field(default=TRAINER_DEFAULTS[f.name])
    return f.name, f.type, field(default=f.default, default_factory=f.default_factory)


# The loss options of a run, in KDOptions' order: the first fields of TrainConfig.
LossConfig = dataclasses.make_dataclass(
    "LossConfig", [_loss_field(f) for f in dataclasses.fields(KDOptions)
                   if f.init and f.name not in SET_BY_THE_TRAINER])
LossConfig.__module__ = __name__  # pickled configs (spawned ranks) find it here
LOSS_OPTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LossConfig))


@dataclass(frozen=True)
class ModelSize:
    """A Llama-architecture model built locally from a config (no hub)."""

    hidden: int
    layers: int
    heads: int
    ffn: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(LossConfig):
    """Every option of `kdk distill`: the loss options (LossConfig, from KDOptions), then
    the trainer's own. Fields that change the numbers are part of the fingerprint that
    --resume checks; output/logging fields are not."""

    tail: str = "bucket"  # top-k students (--teacher-cache): the teacher's mass outside its K
    # optimisation
    max_steps: int = 120
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 25
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    bf16: bool = False
    device: str = "cpu"
    seed: int = 0
    baseline: str = "fused"  # "fused" or "naive" (materialised logits)
    impl: str = "auto"
    threads: int = 0  # CPU threads per rank; 0 = all available cores not busy now
    # on-policy / sequence-level KD (on_policy/batch_source.py); None = derived from seq_len
    on_policy: float = 0.0  # probability that a micro-batch is student-generated
    seq_kd: bool = False  # the teacher generates the (other) micro-batches
    prompt_len: int | None = None  # default seq_len // 2
    prompts: str | None = None  # JSONL of {"prompt": ...} / {"messages": [...]}
    max_new_tokens: int | None = None  # default seq_len - prompt_len
    gen_temperature: float = 1.0
    gen_top_p: float = 1.0
    # bookkeeping (not part of the fingerprint)
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 0
    output: str = "kdk-run"
    progress: bool = True
    # embedded default run (corpus, tokenizer, models)
    vocab_size: int = 8192
    corpus_max_mb: float = 6.0
    heldout_fraction: float = 0.1
    # --data (kdkernels/data/documents.py): the JSONL/table field with the text to train on
    text_field: str = "text"
    # --teacher: the dtype it is loaded in (fp32, bf16, fp16); the student stays fp32
    teacher_dtype: str = "fp32"
    # teacher and student with different tokenizers (sources/cross_pair.py): the loss, "uld"
    # or "hybrid" (None: hybrid when the vocabularies overlap by more than half), and the
    # merge of multi-token spans, "observed" or "bayesian" (None: observed)
    cross_tokenizer: str | None = None
    merge: str | None = None
    teacher_size: ModelSize = field(default_factory=lambda: ModelSize(192, 4, 4, 512))
    student_size: ModelSize = field(default_factory=lambda: ModelSize(96, 2, 4, 256))
    teacher_steps: int = 500
    teacher_lr: float = 3e-3
    # K of the embedded default's top-k cache and student (0: no top-k student). 64 is what
    # the top-k benchmarks use and what inference servers return.
    cache_top_k: int = 64

    FINGERPRINT_EXCLUDE = ("eval_every", "eval_batches", "save_every", "output", "progress",
                           "max_steps", "device", "impl", "threads")
    # Generation options change nothing while generation is off: left out of the fingerprint
    # then, so runs written before they existed still resume.
    GENERATION_FIELDS = ("on_policy", "seq_kd", "prompt_len", "prompts", "max_new_tokens",
                         "gen_temperature", "gen_top_p")

    def fingerprint(self) -> dict[str, Any]:
        """The options a resumed run must share with the run that wrote the checkpoint.
        max_steps is excluded so that a run can be extended; the schedule is rebuilt from it."""
        d = self.to_dict()
        skip = set(self.FINGERPRINT_EXCLUDE)
        if not (self.on_policy or self.seq_kd):
            skip.update(self.GENERATION_FIELDS)
        return {k: v for k, v in d.items() if k not in skip}

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def loss_options(self) -> dict[str, Any]:
        """The options the objectives pass to the loss, by KDOptions field name."""
        return {**{name: getattr(self, name) for name in LOSS_OPTIONS}, "impl": self.impl}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        for k in ("teacher_size", "student_size"):
            if isinstance(d.get(k), dict):
                d[k] = ModelSize(**d[k])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# The embedded default (the TrainConfig defaults) is tuned so that the KD student beats the
# CE student on held-out CE by >= 0.15 nats on every seed within a 10-minute first run on a
# 2-core CPU; bench/results/cpu/default_run_seeds.md has the numbers. The teacher trains 500
# steps (held-out CE ~5.0; 300 steps gave 5.48, barely ahead of students at 5.48-5.57) and the
# students 120: the KD benefit is widest early (200 steps: +0.06 to +0.26 with the old
# teacher; 120 steps with a 600-step teacher: +0.39, +0.45 on seeds 0, 1), and the saved
# student steps pay for the teacher's. T=1 with kd 0.8 / ce 0.2 won against T=2 (which fell
# behind CE). The teacher is cached, so later runs train only the students. smoke is a
# sub-minute end-to-end test (without the top-k student; tests/test_train_cache.py runs it
# with one).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "smoke": dict(max_steps=6, warmup_steps=2, batch_size=4, seq_len=32, eval_every=3,
                  eval_batches=2, vocab_size=512, corpus_max_mb=0.3, teacher_steps=8,
                  cache_top_k=0,
                  teacher_size=ModelSize(64, 2, 2, 128), student_size=ModelSize(32, 1, 2, 64)),
}
# `--preset on-policy` (on_policy/preset.py): off-policy vs on-policy KD from
# the embedded teacher, pinned to the one the default cached (seq 128, batch 16, warm-up 25
# are part of its cache key), so the preset trains no teacher when that cache exists.
# bench/results/cpu/on_policy_probe.md has the measurements behind LAMBDA and the divergence,
# on_policy_seeds.md the 3-seed result.
_ON_POLICY_TEACHER = dict(teacher_size=ModelSize(192, 4, 4, 512), teacher_steps=300,
                          teacher_lr=3e-3, vocab_size=8192, corpus_max_mb=6.0, seq_len=128,
                          batch_size=16, warmup_steps=25, cache_top_k=0)
PRESETS["on-policy"] = dict(_ON_POLICY_TEACHER, on_policy=0.5, divergence="reverse_kl",
                            max_steps=120, eval_every=0)
PRESETS["on-policy-smoke"] = dict(PRESETS["smoke"], on_policy=0.5, divergence="reverse_kl",
                                  eval_every=0)
# `--preset cross-tokenizer` (cross_tokenizer_preset.py): a student with its own BPE distilled
# from the embedded default teacher (whose cache it reuses: the teacher is trained with the
# default's batch, warm-up and window length whatever the students use), CE-only vs ULD vs
# hybrid students, ~100 s a seed at 2 threads once the teacher is cached. kd 0.8 / ce 0.2 and
# merge observed did best for hybrid on a seed-0 probe (kd 1 / ce 1 and bayesian did worse);
# bench/results/cpu/cross_tokenizer_seeds.md has the probes and the 3-seed table.
PRESETS["cross-tokenizer"] = dict(max_steps=100, warmup_steps=20, batch_size=8, eval_every=0,
                                  eval_batches=16, cache_top_k=0)
PRESETS["cross-tokenizer-smoke"] = dict(PRESETS["smoke"], eval_every=0)


def saved_fingerprint(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint a run wrote, with the options it predates (in ``now``, absent from
    ``saved``) at their defaults, which is what that run used: runs written before an option
    existed still resume, unless the option is now set to something else."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    older = {k: defaults[k] for k in now if k not in saved and k in defaults}
    return {**older, **saved}


def preset(name: str, **overrides: Any) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}; got {name!r}")
    return TrainConfig(**{**PRESETS[name], **overrides})
