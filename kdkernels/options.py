"""The loss options: one frozen dataclass, validated once, shared by every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import divergences as _table

DIVERGENCES = _table.NAMES
REDUCTIONS = ("mean", "sum", "none")
# impl names are validated against the backend table at dispatch time (backends/registry.py).

# The same on every device: bigger chunks pay (fewer re-reads of the fp32 grad_weight
# accumulator, fuller GEMM tiles); bench/README.md has the measurements.
DEFAULT_MAX_WORKSPACE_BYTES = 2**30


def is_symbolic(value: Any) -> bool:
    """Whether ``value`` may be a torch.compile symbol (a number that changed between calls
    of a compiled function), whose value is unknown until the graph runs. Dynamo shows a
    SymFloat to the code it traces as a float (isinstance cannot tell them apart), so while
    it traces, every number counts."""
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return True
    return (torch.compiler.is_compiling() and isinstance(value, (int, float))
            and not isinstance(value, bool))


def _check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> Any:
    if is_symbolic(value):
        # No check while tracing (math.isfinite cannot trace a symbol, and a comparison
        # would guard on the value: a recompile per value). The compile op rebuilds the
        # options from the concrete values when the graph runs (engine/custom_ops.py), so
        # a bad value raises there, with the same message.
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a Python number, got a tensor of shape "
                            f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def _check_optional_positive(name: str, value: Any) -> float | None:
    if value is None:
        return None
    return _check_real(name, value, low=0.0, low_open=True)


@dataclass(frozen=True)
class KDOptions:
    """Every scalar option of the distillation loss, checked at construction.

    ``divergence`` keeps the name the user gave; ``effective_divergence`` folds the exact
    special cases (jsd with beta 0 or 1 is forward or reverse KL, as in TRL).

    While torch.compile traces a loss, a number option may be symbolic (``is_symbolic``):
    its value checks and folds wait for the compile op, which rebuilds the options from the
    concrete values when the graph runs (engine/custom_ops.py).
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    alpha: float = 0.5
    temperature: float = 1.0
    scale_by_t2: bool = True
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    student_softcap: float | None = None
    teacher_softcap: float | None = None
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    num_items: float | None = None
    chunk_size: int | None = None
    max_workspace_bytes: int | None = None
    impl: str = "auto"
    return_components: bool = False
    effective_divergence: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if not isinstance(self.divergence, str) or self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; "
                             f"got {self.divergence!r}")
        if not isinstance(self.reduction, str) or self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; "
                             f"got {self.reduction!r}")
        if not isinstance(self.impl, str):
            raise TypeError(f"impl must be a string, got {type(self.impl).__name__}")
        set_("beta", _check_real("beta", self.beta, low=0.0, high=1.0))
        skew = _check_real("skew", self.skew, low=0.0, high=1.0)
        # A weight below fp64 resolution next to 1 (1 - skew == 1) cannot enter a mixture
        # weighted (1 - skew, skew) consistently in every backend: it is exactly 0.
        set_("skew", skew if is_symbolic(skew) or 1.0 - skew != 1.0 else 0.0)
        alpha = _check_real("alpha", self.alpha)
        if not is_symbolic(alpha) and not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in the open interval (0, 1), got {alpha}")
        set_("alpha", alpha)
        set_("temperature", _check_real("temperature", self.temperature, low=0.0, low_open=True))
        set_("kd_weight", _check_real("kd_weight", self.kd_weight, low=0.0))
        set_("ce_weight", _check_real("ce_weight", self.ce_weight, low=0.0))
        set_("student_softcap", _check_optional_positive("student_softcap", self.student_softcap))
        set_("teacher_softcap", _check_optional_positive("teacher_softcap", self.teacher_softcap))
        # Multipliers on the raw logits, applied before the softcap and the temperature.
        for name in ("student_logit_scale", "teacher_logit_scale"):
            set_(name, _check_real(name, getattr(self, name), low=0.0, low_open=True))
        set_("num_items", _check_optional_positive("num_items", self.num_items))
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        for name in ("chunk_size", "max_workspace_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        for name in ("scale_by_t2", "return_components"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        div = _table.get(self.divergence)
        params = self.divergence_params(div)
        # Folding compares the parameters with exact values (jsd at beta 0 or 1): unknown
        # while torch.compile traces a symbolic one (None), decided by the op at run time.
        set_("effective_divergence", None if any(map(is_symbolic, params.values()))
             else div.fold(params) or div.name)

    def divergence_params(self, div: _table.Divergence | None = None) -> dict[str, float]:
        """The values of the options that parameterise ``div`` (default: the chosen one)."""
        div = _table.get(self.divergence) if div is None else div
        return {name: getattr(self, name) for name in div.params}

    @property
    def soft_scale(self) -> float:
        """kd_weight times the Hinton T**2 factor: the weight of the divergence per token."""
        t2 = self.temperature**2 if self.scale_by_t2 else 1.0
        return self.kd_weight * t2

    @property
    def workspace_budget(self) -> int:
        """max_workspace_bytes, or the documented default."""
        if self.max_workspace_bytes is not None:
            return self.max_workspace_bytes
        return DEFAULT_MAX_WORKSPACE_BYTES

    def values(self) -> tuple:
        """Every option the user gave, in field order (what ranks and the compile op agree
        on); ``option_fields()`` names them."""
        return tuple(getattr(self, name) for name in _OPTION_NAMES)


# Read once at import: torch.compile traces a tuple of names, not dataclasses.fields().
_OPTION_FIELDS = tuple(f for f in fields(KDOptions) if f.init)
_OPTION_NAMES = tuple(f.name for f in _OPTION_FIELDS)


def option_fields(options_class: type | None = None) -> tuple:
    """The user-facing fields of KDOptions, in order: the one list of the options. Given
    another options dataclass (TopKOptions, a KDOptions subclass), its own such fields."""
    if options_class is None:
        return _OPTION_FIELDS
    return tuple(f for f in fields(options_class) if f.init)
