"""The end of the tests' multi-process workers."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def exit_worker() -> None:
    """Every rank meets the others at a barrier, then the process ends without running its
    destructors. A rank that destroys its gloo group while a peer's last collective is in
    flight can abort the peer, and the teardown of gloo's (or DeepSpeed's) threads at exit
    aborted a rank with std::terminate after its work was saved (1 test in ~2,000 per fresh-clone
    run on a 2-core EPYC): the results are on disk by now, so nothing is lost by skipping it."""
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
