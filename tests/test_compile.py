"""The fused loss under torch.compile(fullgraph=True): one opaque custom op, same numbers."""

from __future__ import annotations

import pytest
import torch

import kdkernels

from .conftest import cpu_impls

# The Triton interpreter adds nothing here beyond the eager tests and is slow.
IMPLS = [i for i in cpu_impls() if i != "triton"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_matches_eager(impl, reduction):
    torch._dynamo.reset()
    h = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(301, 16, requires_grad=True)
    b = torch.randn(301, requires_grad=True)
    g, u = torch.randn(3, 5, 24), torch.randn(301, 24)
    labels = torch.randint(0, 301, (3, 5))
    labels[0, :2] = -100

    def loss_fn(h, w, b, g, u, labels):
        out = kdkernels.fused_linear_kd_loss(h, w, g, u, labels, student_bias=b,
                                             divergence="jsd", temperature=2.0, ce_weight=0.3,
                                             reduction=reduction, impl=impl, chunk_size=4)
        return out.sum() * 1.5  # grad_output != 1 through the graph

    compiled = torch.compile(loss_fn, fullgraph=True)
    got = compiled(h, w, b, g, u, labels)
    got.backward()
    grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    want = loss_fn(h, w, b, g, u, labels)
    want.backward()
    # Same eager kernels inside the op: identical up to summation order (none).
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for a, t in zip(grads, (h, w, b), strict=True):
        torch.testing.assert_close(a, t.grad, rtol=1e-6, atol=1e-7)


def test_fullgraph_components_and_frozen_head():
    torch._dynamo.reset()
    h = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(50, 8)  # frozen head (LoRA-style)
    labels = torch.randint(0, 50, (12,))

    @torch.compile(fullgraph=True)
    def f(h, w, labels):
        return kdkernels.fused_linear_kd_loss(h, w, h.detach(), w, labels, ce_weight=1.0,
                                              return_components=True)

    out = f(h, w, labels)
    assert int(out.n_tokens) == 12
    torch.testing.assert_close(out.kd, torch.zeros(()), atol=1e-6, rtol=0)
    out.loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_compiled_label_check_still_raises():
    torch._dynamo.reset()
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    f = torch.compile(lambda h, w, y: kdkernels.fused_linear_kd_loss(h, w, h, w, y),
                      fullgraph=True)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        f(h, w, torch.tensor([0, 1, 2, 10]))
