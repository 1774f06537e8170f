"""What every public loss call shares: the result type, input errors held back for the
vocab-parallel agreement, the autocast dtype, the result from the Functions' outputs, and the
nn.Module form of a loss function."""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch

from ..options import KDOptions, option_fields
from ..parallel import VocabParallel


class KDComponents(NamedTuple):
    """``loss`` (differentiable), and, reduced the same way but detached: ``kd`` the
    divergence D before kd_weight and T**2, ``ce`` the hard-label CE before ce_weight (NaN
    without labels), ``n_tokens`` the number of kept tokens (0-d int64, inputs' device),
    ``student_entropy`` the entropy of the student's tempered softmax (after logit scale and
    softcap, at T; reduced like kd) and ``label_logprob`` the student's untempered log-prob
    of the label (= -CE per token, reduced like ce; NaN without labels). Both are exact over
    the full vocabulary and come from the stats pass; the losses always fill them (the
    defaults serve other constructors)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    n_tokens: torch.Tensor
    student_entropy: torch.Tensor | None = None
    label_logprob: torch.Tensor | None = None


def input_failure(check) -> Exception | None:
    """The input error ``check`` raises, held back for the vocab-parallel agreement."""
    try:
        check()
    except (ValueError, TypeError) as err:
        return err
    return None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def finish_outputs(opts: KDOptions, outputs, lead_shape) -> torch.Tensor | KDComponents:
    """The public result from the Functions' or ops' (loss, kd, ce, n_tokens, entropy, ...)."""
    loss, kd, ce, n_tokens, entropy = outputs[:5]
    if opts.reduction == "none":
        loss, kd, ce, entropy = (t.reshape(lead_shape) for t in (loss, kd, ce, entropy))
    if not opts.return_components:
        return loss
    # log p(label) = -CE per token, and linear reductions commute with the sign
    return KDComponents(loss, kd, ce, n_tokens, entropy, -ce)


def _init_signature(options_class: type) -> inspect.Signature:
    """``(self, *, <every option with its default>, vocab_parallel=None)``, as the loss
    functions spell them."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(f.name, keyword, default=f.default, annotation=f.type)
               for f in option_fields(options_class)]
    params.append(inspect.Parameter("vocab_parallel", keyword, default=None,
                                    annotation="VocabParallel | None"))
    return inspect.Signature(params, return_annotation=None)


class LossModule(torch.nn.Module):
    """The nn.Module form of a loss function: options checked at construction (by the
    options dataclass ``options_class``), kept as keywords for every call. Each subclass's
    ``__init__`` shows the fields of its ``options_class`` in ``inspect.signature``."""

    options_class: type = KDOptions

    def __init__(self, *, vocab_parallel: VocabParallel | None = None, **options: Any) -> None:
        super().__init__()
        self.options_class(**options)  # reject bad options now, not at the first batch
        self.options = dict(options)
        self.vocab_parallel = vocab_parallel

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:  # a subclass that spells its own
            return

        def __init__(self, *, vocab_parallel: VocabParallel | None = None,
                     **options: Any) -> None:
            LossModule.__init__(self, vocab_parallel=vocab_parallel, **options)

        __init__.__signature__ = _init_signature(cls.options_class)  # type: ignore[attr-defined]
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = __init__  # type: ignore[method-assign]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
