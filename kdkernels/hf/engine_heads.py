"""LM heads that a fused loss can read under every training engine.

A fused loss reads ``lm_head.weight`` directly instead of calling the head module, so the
engines' own gathering never runs for it:

- DeepSpeed ZeRO-3 keeps every parameter partitioned (shape [0]) outside its module's forward:
  ``heads`` gathers it with ``deepspeed.zero.GatheredParameters`` for the loss call only (the
  fused losses compute the head's gradient in their forward, so nothing re-reads it later).
- FSDP2 (``fully_shard``) heads read outside the root forward are DTensors: ``heads`` turns
  them into one plain tensor with ``full_tensor()``, once per call (per step), not per chunk;
  its backward reduce-scatters the gradient to the shards.
- FSDP1 (flat parameters) holds the head unsharded only inside the forward of the FSDP unit
  that owns it (the root, as Hugging Face's transformer-layer wrapping leaves it).

In every case the loss must run inside the wrapped model's forward (``run_in_forward``, the
forward redirection TRL and Lightning use), so that the engine's backward hooks are armed and
the head's gradient is reduced and partitioned by the engine (DDP's ``prepare_for_backward``,
FSDP's post-backward reduce-scatter, ZeRO-3's gradient partitioning).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from . import models

Head = tuple[torch.Tensor, torch.Tensor | None]


def _zero3_partitioned(params: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The ZeRO-3 parameters among params that are not gathered now, each once (ZeRO-3
    mishandles a parameter listed twice, as tied heads would list it)."""
    found: dict[int, torch.Tensor] = {}
    for p in params:
        if p is None or not hasattr(p, "ds_id"):
            continue
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Already gathered (a tied head inside embed_tokens' forward): leave it to its owner.
        if p.ds_status != ZeroParamStatus.AVAILABLE:
            found[id(p)] = p
    return list(found.values())


@contextlib.contextmanager
def gathered(*params: torch.Tensor | None) -> Iterator[None]:
    """Within the block, ZeRO-3 partitioned params have their full shape; a no-op for the
    rest. Gradients reach them as they do for any module's parameter."""
    partitioned = _zero3_partitioned(list(params))
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def full(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None
         ) -> Head:
    """(weight [V, D], bias [V]) as plain tensors: an FSDP2 DTensor head is gathered here
    (autograd-aware) and cast to ``dtype`` (the hidden states', as TRL does). Raises if the
    head is still a shard (an engine this module does not gather)."""
    if isinstance(weight, torch.distributed.tensor.DTensor):
        weight = weight.full_tensor() if dtype is None else weight.full_tensor().to(dtype)
    if isinstance(bias, torch.distributed.tensor.DTensor):
        bias = bias.full_tensor()
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"the LM head weight has shape {list(weight.shape)}, not [V, D]: it is "
                         "still sharded by the training engine. Call the loss inside the wrapped "
                         "model's forward (kdkernels.hf.engine_heads.run_in_forward) with the "
                         "head gathered (engine_heads.heads); under FSDP1 keep the LM head in "
                         "the root FSDP unit")
    return weight, bias


@contextlib.contextmanager
def heads(*modules: nn.Module) -> Iterator[list[Head]]:
    """The full (weight, bias) of each model's LM head for the duration of the block."""
    raw = [models.head(m) for m in modules]
    with gathered(*[t for pair in raw for t in pair]):
        yield [full(w, b) for w, b in raw]


def run_in_forward(wrapper: nn.Module, module: nn.Module, fn: Callable[..., Any],
                   *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), called from inside ``wrapper``'s forward (DDP, FSDP, a DeepSpeed
    engine, or ``module`` itself), with ``module`` the model it wraps: the engine gathers the
    root's parameters and arms its backward hooks around fn as around a real forward. The
    arguments pass through the wrapper (which may move or cast them); fn's result should be a
    tensor or a tuple of tensors (what DDP and ZeRO-3 look through)."""
    original = module.forward

    def redirected(*inner_args: Any, **inner_kwargs: Any) -> Any:
        module.forward = original  # fn may call the real forward itself
        return fn(*inner_args, **inner_kwargs)

    module.forward = redirected
    try:
        return wrapper(*args, **kwargs)
    finally:
        module.forward = original


def teacher_hidden(wrapper: nn.Module | None, teacher: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The teacher's final hidden states without gradients; through its engine wrapper (a
    ZeRO-3 inference engine) when it has one, so its partitioned parameters are gathered."""
    def run() -> torch.Tensor:
        return models.hidden_states_masked(teacher, input_ids, attention_mask)

    with torch.no_grad():
        if wrapper is None or wrapper is teacher:
            return run()
        return run_in_forward(wrapper, teacher, run)


def zero3_inference(model: nn.Module, trainer_config: dict[str, Any]) -> nn.Module:
    """``model`` (a frozen teacher) partitioned by a ZeRO-3 inference engine built from the
    trainer's DeepSpeed config (no optimizer, no offload of what is not trained), as TRL does
    for its teachers: its parameters are sharded like the student's."""
    import copy

    import deepspeed

    config = _without_auto(copy.deepcopy(trainer_config))
    # No optimizer or scheduler to build; the batch size is recomputed for this engine.
    for key in ("optimizer", "scheduler", "train_batch_size"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _without_auto(config: dict[str, Any]) -> dict[str, Any]:
    """The config less its "auto" entries: the Trainer fills them for its own engine only."""
    return {k: _without_auto(v) if isinstance(v, dict) else v
            for k, v in config.items() if v != "auto"}
