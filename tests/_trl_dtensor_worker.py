"""One rank of a 2-rank gloo world for tests/test_trl_loss.py: FSDP2-style DTensor heads
(Shard(0) over the vocabulary) through fused_divergence_loss and TRL's own loss.

Run as ``python -m tests._trl_dtensor_worker RANK WORLD PORT OUT``; rank 0 saves both losses
and the full student-head and hidden-state gradients to OUT.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from kdkernels.integrations.trl_loss import fused_divergence_loss
from tests._dist import exit_worker


def main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    h, t = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 24, generator=g)
    w, u = torch.randn(101, 16, generator=g) * 0.5, torch.randn(101, 24, generator=g) * 0.4
    b = torch.randn(101, generator=g) * 0.3
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    saved = {}
    for name, fn in (("ours", fused_divergence_loss), ("trl", _chunked_divergence_loss)):
        hs = h.clone().requires_grad_(True)
        ws = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_(True)
        bs = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_(True)
        us = distribute_tensor(u, mesh, [Shard(0)])
        loss, entropy, n = fn(hs, t, ws, us, mask, 0.5, student_lm_head_bias=bs,
                              temperature=1.5)
        loss.backward()
        saved[name] = dict(loss=loss.detach(), entropy=entropy, n=int(n), grad_h=hs.grad,
                           grad_w=ws.grad.full_tensor(), grad_b=bs.grad.full_tensor())
    if rank == 0:
        torch.save(saved, out)
    exit_worker()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
