"""kdkernels: knowledge-distillation losses fused with the LM head, without the logits."""

from .backends.registry import available as available_backends
from .dense.api import FusedLinearKDLoss, KDComponents, fused_linear_kd_loss, kd_loss
from .options import DEFAULT_MAX_WORKSPACE_BYTES, DIVERGENCES, REDUCTIONS, KDOptions
from .parallel import VocabParallel
from .sparse.api import FusedLinearTopKKDLoss, fused_linear_topk_kd_loss, topk_kd_loss
from .sparse.tails import TAILS
from .uld.fused import fused_linear_uld_loss
from .uld.logits import uld_loss

__all__ = [
    "DEFAULT_MAX_WORKSPACE_BYTES",
    "DIVERGENCES",
    "REDUCTIONS",
    "TAILS",
    "FusedLinearKDLoss",
    "FusedLinearTopKKDLoss",
    "KDComponents",
    "KDOptions",
    "VocabParallel",
    "available_backends",
    "fused_linear_kd_loss",
    "kd_loss",
    "topk_kd_loss",
    "fused_linear_topk_kd_loss",
    "uld_loss",
    "fused_linear_uld_loss",
]
__version__ = "0.1.0"
