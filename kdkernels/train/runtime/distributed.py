"""torch.distributed set-up for data-parallel training under torchrun: DDP (gloo on CPU,
NCCL on GPU) or FSDP2 (`fully_shard`). A single process is a world of one."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum(self, value: float) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t)


def init(device: str) -> World:
    """The world torchrun describes in the environment, or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but torch sees no CUDA device; pass --device cpu")
    if size == 1:
        return World(0, 1, torch.device(device))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return World(rank, size, torch.device("cuda", local))
    return World(rank, size, torch.device(device))


def wrap(objective: nn.Module, world: World, mode: str) -> nn.Module:
    """DDP or FSDP2 around the objective (whose forward uses every student parameter)."""
    if world.size == 1 or mode == "none":
        return objective
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DDP(objective, device_ids=ids)
    if mode == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as err:  # torch < 2.6
            raise ValueError("--parallel fsdp needs torch.distributed.fsdp.fully_shard "
                             f"(torch >= 2.6): {err}") from err
        # Decoder layers are sharded; embeddings, final norm and the (tied) head stay
        # replicated so the fused loss can use the head outside any FSDP forward, and their
        # gradients are averaged by hand (loop._sync_replicated_grads).
        for layer in getattr(objective.student.get_decoder(), "layers", []):
            fully_shard(layer)
        return objective
    raise ValueError(f"--parallel must be one of none, ddp, fsdp; got {mode!r}")


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def shutdown() -> None:
    if dist.is_initialized():
        # Every rank arrives before teardown: a rank that destroys its gloo group while a
        # peer's last collective is still in flight can abort (std::terminate) on CPU.
        dist.barrier()
        dist.destroy_process_group()
