"""Teardown for the tests' multi-process workers."""

from __future__ import annotations

import torch.distributed as dist


def close_group() -> None:
    """Every rank arrives before teardown: a rank that destroys its gloo group while a peer's
    last collective is still in flight can abort the peer (std::terminate) on CPU."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
