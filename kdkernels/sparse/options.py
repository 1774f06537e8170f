"""Options of the sparse-teacher losses: ``tail``, then the dense loss's options that apply.

The fields are generated from KDOptions' (``topk_options_of``), so a new dense option is a
top-k option too, with its default, its check and its place in the torch.compile schema.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Any

from ..options import KDOptions, option_fields
from .tails import TAILS, get

# Dense options with no meaning for a teacher given as log-probs: they arrive normalised,
# with no logit scale or softcap of their own (passing one is an unexpected keyword).
TEACHER_LOGIT_OPTIONS = ("teacher_softcap", "teacher_logit_scale")


class _TopKBehaviour:
    """The checks and views of TopKOptions; the generated dataclass adds the fields."""

    tail: str  # a generated field (annotated here for readers; dataclass ignores this base)
    _dense_class: type  # the options dataclass the shared fields come from
    _shared: tuple[str, ...]  # their names, in field order
    _names: tuple[str, ...]  # every field's, in order (read once: compile traces names)

    def __post_init__(self) -> None:
        if not isinstance(self.tail, str) or self.tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}; got {self.tail!r}")
        # The shared options are checked by the dense dataclass itself: the same messages.
        dense = self._dense_class(**{name: getattr(self, name) for name in self._shared})
        for name in self._shared:  # the normalised values (floats, folded skew, ...)
            object.__setattr__(self, name, getattr(dense, name))
        object.__setattr__(self, "_dense", dense)
        tail = get(self.tail)
        # jsd at beta 0 is forward KL; with a symbolic beta (torch.compile tracing) the
        # compile op checks this when the graph runs, from the concrete options.
        effective = dense.effective_divergence
        if effective is not None and effective not in tail.divergences:
            raise ValueError(
                f"divergence={dense.divergence!r} is not defined under tail={self.tail!r}: "
                f"{tail.rule}; it takes divergence in {{{', '.join(tail.divergences)}}}")

    @property
    def effective_divergence(self) -> str | None:
        """The divergence the tail rule computes (jsd at beta 0 / 1 folded to the KL); None
        while torch.compile traces a symbolic parameter."""
        return self.dense.effective_divergence

    @property
    def dense(self) -> KDOptions:
        """The shared options as a KDOptions (reductions, budgets, the row spec)."""
        return self._dense  # type: ignore[attr-defined]

    @property
    def workspace_budget(self) -> int:
        """max_workspace_bytes, or the documented default (what the chunk planner reads)."""
        return self.dense.workspace_budget

    def values(self) -> tuple:
        """Every option, in field order (what ranks and the compile ops agree on)."""
        return tuple(getattr(self, name) for name in self._names)


def topk_options_of(dense: type = KDOptions) -> type:
    """The top-k options dataclass over the dense options dataclass ``dense``: ``tail``, then
    each of its user-facing fields (same type and default) but TEACHER_LOGIT_OPTIONS."""
    shared = [f for f in option_fields(dense) if f.name not in TEACHER_LOGIT_OPTIONS]
    specs: list[tuple[str, Any, Any]] = [("tail", "str", field(default="bucket"))]
    specs += [(f.name, f.type, field(default=f.default, default_factory=f.default_factory))
              for f in shared]
    namespace = {
        "__module__": __name__,
        "__doc__": "Every scalar option of the top-k loss, checked at construction (the "
                   "same messages as the dense loss for the shared options; a divergence "
                   "that a tail does not define raises naming the tail's rule).",
        "_dense_class": dense,
        "_shared": tuple(f.name for f in shared),
        "_names": tuple(name for name, _, _ in specs),
    }
    return make_dataclass("TopKOptions", specs, bases=(_TopKBehaviour,), frozen=True,
                          namespace=namespace)


TopKOptions = topk_options_of(KDOptions)
_FIELDS = option_fields(TopKOptions)


def topk_option_fields() -> tuple:
    """The fields of TopKOptions, in order: the one list of the top-k options."""
    return _FIELDS
