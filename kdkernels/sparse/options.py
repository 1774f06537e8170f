"""Options of the sparse-teacher losses: the dense loss's options that apply, plus ``tail``."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..options import KDOptions
from .tails import TAILS, get

# Options the top-k loss shares with the dense one, validated by KDOptions itself.
_SHARED = ("divergence", "beta", "skew", "alpha", "temperature", "scale_by_t2", "kd_weight",
           "ce_weight", "student_softcap", "student_logit_scale", "ignore_index", "reduction",
           "num_items", "chunk_size", "max_workspace_bytes", "impl", "return_components")


@dataclass(frozen=True)
class TopKOptions:
    """Every scalar option of the top-k loss, checked at construction (the same messages as
    the dense loss for the shared options; a divergence that a tail does not define raises
    naming the tail's rule)."""

    tail: str = "bucket"
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    alpha: float = 0.5
    temperature: float = 1.0
    scale_by_t2: bool = True
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    student_softcap: float | None = None
    # No teacher_logit_scale: the teacher arrives as log-probs, already normalised (the
    # dense option keeps its default 1 here, and passing it is an unexpected keyword).
    student_logit_scale: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    num_items: float | None = None
    chunk_size: int | None = None
    max_workspace_bytes: int | None = None
    impl: str = "auto"
    return_components: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tail, str) or self.tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}; got {self.tail!r}")
        dense = KDOptions(**{name: getattr(self, name) for name in _SHARED})
        for name in _SHARED:  # the normalised values (floats, folded skew, ...)
            object.__setattr__(self, name, getattr(dense, name))
        object.__setattr__(self, "_dense", dense)
        tail = get(self.tail)
        if dense.effective_divergence not in tail.divergences:  # jsd at beta 0 is forward KL
            raise ValueError(
                f"divergence={self.divergence!r} is not defined under tail={self.tail!r}: "
                f"{tail.rule}; it takes divergence in {{{', '.join(tail.divergences)}}}")

    @property
    def effective_divergence(self) -> str:
        """The divergence the tail rule computes (jsd at beta 0 / 1 folded to the KL)."""
        return self.dense.effective_divergence

    @property
    def dense(self) -> KDOptions:
        """The shared options as a KDOptions (reductions, budgets, the row spec)."""
        return self._dense  # type: ignore[attr-defined]

    def values(self) -> tuple:
        return tuple(getattr(self, f.name) for f in _FIELDS)


_FIELDS = tuple(fields(TopKOptions))


def topk_option_fields() -> tuple:
    """The fields of TopKOptions, in order: the one list of the top-k options."""
    return _FIELDS
