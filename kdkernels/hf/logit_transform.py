"""How a Hugging Face causal LM turns its LM-head output into logits: one place that reads a
config's logit post-processing, for every integration and the trainer.

The models apply, after ``z = h @ W.T (+ b)``:

    logits = softcap * tanh(scale * z / softcap)     (just ``scale * z`` without a softcap)

where ``scale`` comes from the first of these config attributes that is set (the order TRL's
DistillationTrainer reads them in, so both agree on every model):

- ``logit_scale`` (Cohere, Cohere2, Cohere2-MoE, Cohere Compass): multiplied;
- ``output_multiplier`` (Muse Glimmer / Spark): multiplied, before the softcap;
- ``lm_head_multiplier`` (Falcon-H1): multiplied;
- ``logits_scaling``: divided (Granite, Granite-MoE/-Shared/-Hybrid, Granite vision models,
  MiniCPM3) except for HyperCLOVA X, which multiplies by it.

MiniCPM3 divides the final hidden states before its bias-free head, which is the same division
of the logits. ``final_logit_softcapping`` is the Gemma-2 family's softcap. Multimodal models
keep these on their text config, so the text config is read.
"""

from __future__ import annotations

import math
from typing import Any

# Config attributes whose value multiplies the logits, in the order they are looked for.
_MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier")
# Text model types that multiply by `logits_scaling` where Granite and MiniCPM3 divide by it
# (transformers' modeling_hyperclovax.py: "MuP: multiply logits by logits_scaling").
_LOGITS_SCALING_MULTIPLIES = frozenset({"hyperclovax"})


def _text_config(config: Any) -> Any:
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("config must be a Hugging Face PretrainedConfig (model.config); "
                         f"got {type(config).__name__}")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _positive(value: Any, name: str, model_type: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"config.{name} of the {model_type!r} model must be a finite number > 0; "
                         f"got {value!r}")
    return number


def logit_transform(config: Any) -> tuple[float, float | None]:
    """``(scale, softcap)`` of a model's logits: ``scale`` (1.0 when the model has none)
    multiplies the LM-head output before the softcap (None when the model has none)."""
    text = _text_config(config)
    model_type = str(getattr(text, "model_type", "") or "")
    scale = 1.0
    for name in _MULTIPLIERS:
        value = getattr(text, name, None)
        if value is not None:  # None means "no scale" (e.g. Cohere Compass without one)
            scale = _positive(value, name, model_type)
            break
    else:
        value = getattr(text, "logits_scaling", None)
        if value is not None:
            divisor = _positive(value, "logits_scaling", model_type)
            scale = divisor if model_type in _LOGITS_SCALING_MULTIPLIES else 1.0 / divisor
    cap = getattr(text, "final_logit_softcapping", None)
    # Gemma-2 configs use None (and older checkpoints 0) for "no softcap".
    softcap = _positive(cap, "final_logit_softcapping", model_type) if cap else None
    return scale, softcap


def apply_logit_transform(logits, scale: float, softcap: float | None):
    """The models' own post-processing on materialised logits (tests, naive baselines)."""
    z = logits * scale if scale != 1.0 else logits
    return z if softcap is None else softcap * (z / softcap).tanh()


def loss_transform_options(student_config: Any, teacher_config: Any | None = None
                           ) -> dict[str, float | None]:
    """The fused losses' keyword arguments for the models' logit post-processing:
    student_/teacher_logit_scale and student_/teacher_softcap (the teacher's only when a
    teacher config is given: the top-k losses take the student's alone)."""
    options: dict[str, float | None] = {}
    for side, config in (("student", student_config), ("teacher", teacher_config)):
        if config is not None:
            options[f"{side}_logit_scale"], options[f"{side}_softcap"] = logit_transform(config)
    return options
