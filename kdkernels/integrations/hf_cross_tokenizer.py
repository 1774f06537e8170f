"""KDTrainer across tokenizers: ULD / GOLD's hybrid loss, fused from both models' hidden states.

    collator = CrossTokenizerCollator(student_tokenizer, teacher_tokenizer)   # the default
    trainer = KDTrainer(model=student, teacher_model=teacher, teacher_tokenizer=teacher_tok,
                        processing_class=student_tokenizer, args=TrainingArguments(...),
                        train_dataset=[{"prompt": ..., "completion": ...}, ...],
                        cross_tokenizer="hybrid", merge="observed")

When ``teacher_tokenizer`` is given and its vocabulary differs from the student's (the trainer's
``processing_class``), or ``cross_tokenizer`` is named, KDTrainer takes this path:

- **Batches** carry both tokenizations of prompt/completion text records
  (``CrossTokenizerCollator``, built on ``kdkernels.uld.uld_inputs_from_text``): the student's
  ``input_ids``, ``attention_mask``, ``labels`` (ignore_index outside the completion and its EOS)
  and ``student_offsets``, the teacher's ``teacher_input_ids``, ``teacher_attention_mask``,
  ``teacher_labels`` and ``teacher_offsets`` (UTF-8 byte spans from the completion's start), and
  ``completion_bytes`` (for bits per byte). A collator of your own must give the same keys
  (offsets may be left out on both sides: positional alignment, GOLD's non-extended ULD).
- **Loss**: ``kdkernels.fused_linear_uld_loss`` on both models' final hidden states and LM heads
  (full, unshifted sequences, as GOLD's ULDLoss takes logits), run inside the wrapped student's
  forward with the heads gathered (``engine_heads``, as KDTrainer's shared-vocabulary path does
  for DDP, FSDP1/2 and ZeRO-3; this path is tested in one process).
  ``cross_tokenizer="uld"`` is the plain sorted-L1 ULD, ``"hybrid"`` GOLD's hybrid with
  ``vocab_map = build_vocab_map(student_tokenizer, teacher_tokenizer, teacher head rows)``;
  the default is ``default_cross_tokenizer``: hybrid when more than half of the teacher's
  tokenizer maps to student tokens. The other options are the loss's (``ULDTrainerOptions``).
- **Reduction**: GOLD's mean over the micro-batch's samples; the Trainer divides it by the
  gradient-accumulation steps (``loss_is_scaled_for_ga = False``), so equal micro-batches give
  the mean of one big batch (as GOLDTrainer). ``num_items_in_batch`` (a token count) is not used:
  the loss is per sample, not per token.
- **Logit transforms**: a model's logit scale (Cohere, Granite, ...) multiplies its hidden
  states and bias before the head (the same logits); a softcap (Gemma-2) is refused, as the
  fused ULD loss has none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..hf import engine_heads, models
from ..hf.logit_transform import logit_transform
from ..uld.align import check_merge
from ..uld.fused import fused_linear_uld_loss
from ..uld.text import uld_inputs_from_text
from ..uld.vocab import build_vocab_map

CROSS_TOKENIZER_MODES = ("uld", "hybrid")
# What a cross-tokenizer batch carries besides input_ids / attention_mask / labels.
TEACHER_KEYS = ("teacher_input_ids", "teacher_labels", "teacher_attention_mask")
OFFSET_KEYS = ("student_offsets", "teacher_offsets")
# Dataset columns the default collator reads (kept by the Trainer's remove_unused_columns).
TEXT_COLUMNS = ("prompt", "completion")


@dataclasses.dataclass(frozen=True)
class ULDTrainerOptions:
    """KDTrainer's cross-tokenizer options: those of fused_linear_uld_loss (same names and
    defaults; ``reduction`` and ``ignore_index`` are the trainer's: "mean", -100) plus
    ``cross_tokenizer`` ("uld" | "hybrid" | None = default_cross_tokenizer)."""

    cross_tokenizer: str | None = None
    merge: str = "observed"
    matched_weight: float | None = None
    unmatched_weight: float | None = None
    beta: float = 0.5
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    skip_student_eos: bool = True
    skip_teacher_eos: bool = True
    distillation_weight: float = 1.0
    ce_weight: float = 0.0
    impl: str = "auto"
    chunk_size: int | None = None
    max_workspace_bytes: int | None = None
    uld_top_k: int | None = None

    def __post_init__(self) -> None:
        if self.cross_tokenizer is not None and self.cross_tokenizer not in CROSS_TOKENIZER_MODES:
            raise ValueError(f"cross_tokenizer must be one of {', '.join(CROSS_TOKENIZER_MODES)} "
                             f"or None; got {self.cross_tokenizer!r}")
        check_merge(self.merge)

    def loss_kwargs(self) -> dict[str, Any]:
        """fused_linear_uld_loss's keywords (vocab_map apart)."""
        out = dataclasses.asdict(self)
        out.pop("cross_tokenizer")
        return out


ULD_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ULDTrainerOptions))
# Names the shared-vocabulary loss (KDOptions) has too: with a different teacher tokenizer they
# are the cross-tokenizer loss's.
SHARED_NAMES = ("beta", "ce_weight", "impl", "chunk_size", "max_workspace_bytes")


def same_vocabulary(student_tokenizer, teacher_tokenizer) -> bool:
    return student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()


def matched_share(student_tokenizer, teacher_tokenizer) -> float:
    """The share of the teacher tokenizer's tokens whose string is a student token (GOLD's
    default hybrid matched_weight, n_matched / Vt, over the tokenizer's entries)."""
    student, teacher = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    return sum(s in student for s in teacher) / max(len(teacher), 1)


def default_cross_tokenizer(student_tokenizer, teacher_tokenizer) -> str:
    """"hybrid" when the vocabularies overlap by more than half (matched_share > 0.5), else
    "uld"."""
    return "hybrid" if matched_share(student_tokenizer, teacher_tokenizer) > 0.5 else "uld"


class CrossTokenizerCollator:
    """Text records -> a cross-tokenizer batch for KDTrainer (module docstring's keys).

    Each record has ``prompt`` (a string, or messages with ``chat_template``) and
    ``completion`` (a string); ``uld_inputs_from_text`` tokenizes both with each tokenizer
    (``max_length``, ``chat_template`` None | "own" | "student", ``add_eos`` as there).
    ``offsets=False`` leaves the byte offsets out (positional alignment)."""

    def __init__(self, student_tokenizer, teacher_tokenizer, *, max_length: int | None = None,
                 chat_template: str | None = None, add_eos: bool = True, offsets: bool = True,
                 prompt_key: str = "prompt", completion_key: str = "completion",
                 ignore_index: int = -100) -> None:
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.max_length, self.chat_template, self.add_eos = max_length, chat_template, add_eos
        self.offsets = offsets
        self.prompt_key, self.completion_key = prompt_key, completion_key
        self.ignore_index = ignore_index

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        for i, f in enumerate(features):
            missing = [k for k in (self.prompt_key, self.completion_key) if k not in f]
            if missing:
                raise KeyError(f"example {i} has no {' or '.join(repr(k) for k in missing)} "
                               f"(CrossTokenizerCollator reads prompt/completion text records; "
                               f"keys found: {sorted(f)})")
        enc = uld_inputs_from_text(
            [f[self.prompt_key] for f in features], [f[self.completion_key] for f in features],
            self.student_tokenizer, self.teacher_tokenizer, max_length=self.max_length,
            chat_template=self.chat_template, add_eos=self.add_eos,
            ignore_index=self.ignore_index, return_vocab_map=False)
        out = {"input_ids": enc["student_input_ids"],
               "attention_mask": enc["student_attention_mask"],
               "labels": enc["student_labels"],
               "teacher_input_ids": enc["teacher_input_ids"],
               "teacher_attention_mask": enc["teacher_attention_mask"],
               "teacher_labels": enc["teacher_labels"],
               "completion_bytes": enc["completion_bytes"]}
        if self.offsets:
            out["student_offsets"] = enc["student_offsets"]
            out["teacher_offsets"] = enc["teacher_offsets"]
        return out


def pop_options(kwargs: dict[str, Any], teacher_tokenizer, kd_option_names: Sequence[str],
                trainer: str = "KDTrainer") -> ULDTrainerOptions | None:
    """The cross-tokenizer options taken out of ``kwargs`` when this path applies (a
    ``teacher_tokenizer`` whose vocabulary differs from ``kwargs["processing_class"]``'s, or
    ``cross_tokenizer`` named), else None with ``kwargs`` untouched but for ULD-only names,
    which are refused. Options of the shared-vocabulary loss only are refused on this path."""
    uld_only = [n for n in ULD_OPTION_NAMES if n in kwargs and n not in SHARED_NAMES]
    student_tokenizer = kwargs.get("processing_class")
    if teacher_tokenizer is None:
        if uld_only:
            raise TypeError(f"{trainer}: {', '.join(uld_only)} apply to cross-tokenizer "
                            "distillation only: pass teacher_tokenizer= (the teacher's tokenizer)")
        return None
    if student_tokenizer is None or not callable(getattr(student_tokenizer, "get_vocab", None)):
        raise ValueError(f"{trainer}: teacher_tokenizer= needs the student's tokenizer as "
                         "processing_class= (the two vocabularies are compared and both "
                         "tokenize the text)")
    if kwargs.get("cross_tokenizer") is None and same_vocabulary(student_tokenizer,
                                                                 teacher_tokenizer):
        if uld_only:
            raise TypeError(f"{trainer}: {', '.join(uld_only)} apply to cross-tokenizer "
                            "distillation only, and the teacher's tokenizer has the student's "
                            "vocabulary (pass cross_tokenizer= to use the ULD loss anyway)")
        return None
    kd_only = [n for n in kd_option_names if n in kwargs and n not in ULD_OPTION_NAMES]
    if kd_only:
        raise TypeError(f"{trainer}: {', '.join(kd_only)} are options of the shared-vocabulary "
                        "loss; with a teacher_tokenizer of another vocabulary the loss is ULD / "
                        f"GOLD's hybrid, whose options are {', '.join(ULD_OPTION_NAMES)}")
    options = ULDTrainerOptions(**{n: kwargs.pop(n) for n in ULD_OPTION_NAMES if n in kwargs})
    if options.cross_tokenizer is None:
        mode = default_cross_tokenizer(student_tokenizer, teacher_tokenizer)
        options = dataclasses.replace(options, cross_tokenizer=mode)
    if kwargs.get("data_collator") is None:
        kwargs["data_collator"] = CrossTokenizerCollator(student_tokenizer, teacher_tokenizer)
    return options


def _check_fits(name: str, tokenizer, model: nn.Module) -> None:
    n, r = len(tokenizer), models.rows(models.head(model)[0])
    if r < n:
        raise ValueError(f"the {name}'s tokenizer has {n} tokens but its LM head has {r} rows; "
                         "every head needs at least as many rows as its tokenizer has tokens")


def _transform(model: nn.Module, name: str) -> float:
    scale, softcap = logit_transform(model.config)
    if softcap is not None:
        raise ValueError(f"the {name} model caps its logits (final_logit_softcapping="
                         f"{softcap}); the fused cross-tokenizer loss has no softcap")
    return scale


class CrossTokenizerLoss:
    """One KDTrainer's cross-tokenizer loss: its options, vocab_map and the models' logit
    scales, fixed at construction."""

    def __init__(self, options: ULDTrainerOptions, student: nn.Module, teacher: nn.Module,
                 student_tokenizer, teacher_tokenizer, device: torch.device) -> None:
        _check_fits("student", student_tokenizer, student)
        _check_fits("teacher", teacher_tokenizer, teacher)
        self.options = options
        self.student_scale = _transform(student, "student")
        self.teacher_scale = _transform(teacher, "teacher")
        self.vocab_map = None
        if options.cross_tokenizer == "hybrid":
            vt = models.rows(models.head(teacher)[0])
            self.vocab_map = build_vocab_map(student_tokenizer, teacher_tokenizer, vt).to(device)
        self.kwargs = options.loss_kwargs()

    @staticmethod
    def batch(inputs: Mapping[str, Any]) -> tuple[torch.Tensor | None, ...]:
        """(input_ids, attention_mask, labels, teacher_input_ids, teacher_attention_mask,
        teacher_labels, student_offsets, teacher_offsets) of a batch, checked."""
        need = ("input_ids", "labels") + TEACHER_KEYS[:2]
        missing = [k for k in need if inputs.get(k) is None]
        if missing:
            raise KeyError(f"a cross-tokenizer batch needs {', '.join(missing)} (found "
                           f"{sorted(inputs)}); use CrossTokenizerCollator or give the same keys")
        offsets = [inputs.get(k) for k in OFFSET_KEYS]
        if (offsets[0] is None) != (offsets[1] is None):
            given = OFFSET_KEYS[0] if offsets[0] is not None else OFFSET_KEYS[1]
            raise KeyError(f"the batch has {given} but not the other side's offsets: give both "
                           "(byte-span alignment) or neither (positional)")
        return (inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"],
                inputs["teacher_input_ids"], inputs.get("teacher_attention_mask"),
                inputs["teacher_labels"], *offsets)

    def __call__(self, student: nn.Module, teacher: nn.Module, teacher_engine: nn.Module | None,
                 input_ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor,
                 t_ids: torch.Tensor, t_mask: torch.Tensor | None, t_labels: torch.Tensor,
                 s_off: torch.Tensor | None, t_off: torch.Tensor | None) -> torch.Tensor:
        """The loss from the two models' final hidden states; call it inside the wrapped
        student's forward (engine_heads.run_in_forward)."""
        hidden = models.base_model(student)(input_ids=input_ids, attention_mask=mask,
                                            use_cache=False).last_hidden_state
        t_hidden = engine_heads.teacher_hidden(teacher_engine, teacher, t_ids, t_mask)
        with engine_heads.heads(student, teacher) as pair:
            (weight, bias), (t_weight, t_bias) = pair
            if self.student_scale != 1.0:
                hidden = hidden * self.student_scale
                bias = None if bias is None else bias * self.student_scale
            if self.teacher_scale != 1.0:
                t_hidden = t_hidden * self.teacher_scale
                t_bias = None if t_bias is None else t_bias * self.teacher_scale
            return fused_linear_uld_loss(
                hidden, weight, t_hidden, t_weight, labels, t_labels, input_ids, t_ids, s_off,
                t_off, student_bias=bias, teacher_bias=t_bias, vocab_map=self.vocab_map,
                reduction="mean", ignore_index=-100, **self.kwargs)


def signature_columns(columns: list[str] | None) -> list[str]:
    """The Trainer's kept dataset columns plus the text the collator reads."""
    columns = list(columns or [])
    return columns + [c for c in TEXT_COLUMNS + TEACHER_KEYS + OFFSET_KEYS if c not in columns]
