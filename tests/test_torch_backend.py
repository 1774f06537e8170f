"""The torch backend's row blocks: the suite's shapes fit one block, so force blocks of one
and of a few rows and check every pass against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

import kdkernels
from kdkernels.backends import torch_rows
from kdkernels.reference import reference_kd_loss

from ._helpers import rel_err

# fp32 row math on logits of scale ~3 over <= 613 columns: sums carry ~1e-7 relative
# rounding; 1e-5 leaves margin while a wrong block boundary (a row read from another block,
# a stale scratch row) is off by O(1).
TOL = 1e-5


@pytest.mark.parametrize("rows_per_block", [1, 3])
@pytest.mark.parametrize("div", kdkernels.DIVERGENCES)
def test_blocks_of_a_few_rows_match_the_oracle(div, rows_per_block, monkeypatch):
    vocab = 613
    # a block holds max(_CPU_BLOCK_ELEMS, threads * per-thread) elements: rows_per_block rows
    monkeypatch.setattr(torch_rows, "_CPU_BLOCK_ELEMS", rows_per_block * vocab)
    monkeypatch.setattr(torch_rows, "_CPU_BLOCK_ELEMS_PER_THREAD", 1)
    gen = torch.Generator().manual_seed(kdkernels.DIVERGENCES.index(div))
    n = 11
    zs = (torch.randn(n, vocab, generator=gen) * 3).requires_grad_()
    zt = torch.randn(n, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[[2, 7]] = -100
    with torch.no_grad():
        zs[7] = float("nan")  # an ignored row may hold garbage
    opts = dict(divergence=div, temperature=1.7, ce_weight=0.4, beta=0.3, skew=0.2,
                student_softcap=20.0, chunk_size=5)
    loss = kdkernels.kd_loss(zs, zt, labels, impl="torch", **opts)
    loss.backward()
    z64 = zs.detach().double().requires_grad_()
    with torch.no_grad():
        z64[7] = 0.0  # the oracle sees finite values; the row is ignored either way
    ref = reference_kd_loss(z64, zt.double(), labels, **opts)["loss"]
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) <= TOL
    assert (zs.grad[[2, 7]] == 0).all()
    assert rel_err(zs.grad, z64.grad) <= TOL


def test_cpu_scratch_is_a_block_not_the_chunk(monkeypatch):
    """On CPUs the scratch is a fixed few MiB, so the chunk budget counts only the two
    logit buffers; elsewhere it counts _TEMPS fp32 temporaries per logit."""
    sizes = []
    init = torch_rows._Blocks.__init__

    def spy(self, x, k):
        init(self, x, k)
        sizes.append(self.scratch.numel())

    monkeypatch.setattr(torch_rows._Blocks, "__init__", spy)
    n, vocab = 3000, 1009
    zs = torch.randn(n, vocab, requires_grad=True)
    kdkernels.kd_loss(zs, torch.randn(n, vocab), divergence="jsd", impl="torch").backward()
    block = max(torch_rows._CPU_BLOCK_ELEMS,
                torch.get_num_threads() * torch_rows._CPU_BLOCK_ELEMS_PER_THREAD)
    assert sizes and max(sizes) <= torch_rows._TEMPS * max(block, vocab) < n * vocab
    assert torch_rows.workspace_bytes_per_logit(torch.bfloat16, "cpu") == 4
    assert torch_rows.workspace_bytes_per_logit(torch.float32, "cuda") == 8 + 4 * 4
    assert torch_rows.workspace_bytes_per_logit(torch.float64, "cuda") == 16 + 8 * 4
