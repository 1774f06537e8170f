"""The reference distillation trainer behind `kdk distill` (see docs/trainer.md)."""

from .config import PRESETS, ModelSize, TrainConfig, preset
from .objectives.dense import DistillObjective
from .runtime.evaluation import heldout_ce

__all__ = ["PRESETS", "DistillObjective", "ModelSize", "TrainConfig", "heldout_ce", "preset"]
