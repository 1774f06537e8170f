"""kdkernels: knowledge-distillation losses fused with the LM head, without the logits."""

from .api import FusedLinearKDLoss, KDComponents, fused_linear_kd_loss, kd_loss
from .backends.registry import available as available_backends
from .options import DEFAULT_MAX_WORKSPACE_BYTES, DIVERGENCES, REDUCTIONS, KDOptions
from .parallel import VocabParallel

__all__ = [
    "DEFAULT_MAX_WORKSPACE_BYTES",
    "DIVERGENCES",
    "REDUCTIONS",
    "FusedLinearKDLoss",
    "KDComponents",
    "KDOptions",
    "VocabParallel",
    "available_backends",
    "fused_linear_kd_loss",
    "kd_loss",
]
__version__ = "0.1.0"
