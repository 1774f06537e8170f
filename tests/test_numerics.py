"""Edge cases: extreme logits, empty and fully ignored batches, non-finite inputs, autocast,
frozen heads, padded vocabularies, components, gradient accumulation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kdkernels
from kdkernels.engine import gemm
from kdkernels.reference import reference_fused_linear_kd_loss, reference_kd_loss

from ._helpers import make_fused, run_fused
from .conftest import cpu_impls

DIVS = kdkernels.DIVERGENCES


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_extreme_logits_finite_and_accurate(impl, div, scale):
    g = torch.Generator().manual_seed(2)
    zs = (torch.rand(8, 129, generator=g) * 2 - 1) * scale
    zt = (torch.rand(8, 129, generator=g) * 2 - 1) * scale
    zs[0], zt[0] = zs[0].clone(), zs[0].clone()  # identical one-hot-ish rows
    labels = torch.randint(0, 129, (8,), generator=g)
    z = zs.clone().requires_grad_()
    loss = kdkernels.kd_loss(z, zt, labels, divergence=div, ce_weight=0.5, impl=impl)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    z64 = zs.double().requires_grad_()
    ref = reference_kd_loss(z64, zt.double(), labels, divergence=div, ce_weight=0.5)["loss"]
    ref.backward()
    # Backward-stable bound: our result is the exact one for logits perturbed by a few fp32
    # ulps, and ulp(|z|) = scale * 2**-23 moves each log-prob by that much; the loss and
    # gradient (O(1) and O(1/N) entries) then err by ~1e-6 * scale relative at most.
    tol = 8 * scale * 2.0**-23 + 1e-6
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=tol, atol=tol / 8)


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("reduction", kdkernels.REDUCTIONS)
def test_empty_and_fully_ignored_batches(impl, reduction):
    for n, labels in ((0, torch.zeros(0, dtype=torch.long)), (5, torch.full((5,), -100))):
        h = torch.randn(n, 8, requires_grad=True)
        w = torch.randn(33, 8, requires_grad=True)
        b = torch.randn(33, requires_grad=True)
        loss = kdkernels.fused_linear_kd_loss(h, w, torch.randn(n, 4), torch.randn(33, 4),
                                              labels, student_bias=b, ce_weight=1.0,
                                              reduction=reduction, impl=impl)
        assert loss.shape == ((n,) if reduction == "none" else ())
        assert (loss == 0).all()
        loss.sum().backward()
        for t in (h, w, b):
            assert t.grad is not None and (t.grad == 0).all()
        zs = torch.randn(n, 33, requires_grad=True)
        out = kdkernels.kd_loss(zs, torch.randn(n, 33), labels, reduction=reduction, impl=impl)
        assert (out == 0).all()
        out.sum().backward()
        assert (zs.grad == 0).all()


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("div", DIVS)
def test_non_finite_inputs_give_non_finite_loss(impl, div):
    inp = make_fused(6, 40, 40, 8, 8, torch.float32, seed=1)
    for bad in (float("nan"), float("inf")):
        h = inp["h"].detach().clone()
        h[2, 3] = bad
        loss = kdkernels.fused_linear_kd_loss(h, inp["w"], inp["g"], inp["u"], inp["labels"],
                                              divergence=div, impl=impl)
        assert not torch.isfinite(loss)
        zt = torch.randn(6, 40)
        zt[1, 5] = bad
        assert not torch.isfinite(kdkernels.kd_loss(torch.randn(6, 40), zt, divergence=div,
                                                    impl=impl))


def test_autocast_bf16_with_fp32_master_weights():
    inp = make_fused(24, 300, 300, 32, 16, torch.float32, bias=True, seed=4)
    h, w = inp["h"].detach().clone().requires_grad_(), inp["w"].detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kdkernels.fused_linear_kd_loss(h, w, inp["g"], inp["u"], inp["labels"],
                                              student_bias=inp["bs"], teacher_bias=inp["bt"],
                                              ce_weight=0.5, chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert h.grad.dtype == torch.float32
    # bf16 GEMM inputs: agreement with the float64 oracle at bf16 precision (2**-8 relative,
    # a few roundings), far from what a wrong cast would give (O(1)).
    ref = run_fused(reference_fused_linear_kd_loss, inp, ce_weight=0.5)
    torch.testing.assert_close(loss.double(), ref[0], rtol=2e-2, atol=0)
    rel = (w.grad.double() - ref[2]).norm() / ref[2].norm()
    assert rel < 3e-2


def test_frozen_head_skips_weight_gemm(monkeypatch):
    inp = make_fused(10, 50, 50, 8, 8, torch.float32, seed=6)

    def forbidden(*args, **kwargs):
        raise AssertionError("grad_weight GEMM ran for a frozen head")

    monkeypatch.setattr(gemm, "accumulate_matmul_", forbidden)
    h = inp["h"].detach().clone().requires_grad_()
    w = inp["w"].detach().clone()
    loss = kdkernels.fused_linear_kd_loss(h, w, inp["g"], inp["u"], inp["labels"], impl="torch")
    loss.backward()
    ref = run_fused(reference_fused_linear_kd_loss, inp)
    torch.testing.assert_close(h.grad.double(), ref[1], rtol=1e-5, atol=1e-7)
    assert w.grad is None


def test_padded_vocab_uses_shared_rows_only():
    """151,936 vs 152,064-style padding: extra head rows never enter either softmax."""
    inp = make_fused(9, 37, 45, 8, 8, torch.float32, bias=True, seed=8)
    loss, gh, gw, gb = run_fused(kdkernels.fused_linear_kd_loss, inp, ce_weight=0.2)
    assert gw.shape == (37, 8)
    trimmed = dict(inp, u=inp["u"][:37], bt=inp["bt"][:37])
    again = run_fused(kdkernels.fused_linear_kd_loss, trimmed, ce_weight=0.2)
    torch.testing.assert_close(loss, again[0])
    big = make_fused(9, 45, 37, 8, 8, torch.float32, bias=True, seed=8)
    _, _, gw2, gb2 = run_fused(kdkernels.fused_linear_kd_loss, big)
    assert (gw2[37:] == 0).all() and (gb2[37:] == 0).all()


def test_components_and_module():
    inp = make_fused(3 * 7, 61, 61, 8, 8, torch.float32, ignore_frac=0.3, seed=9,
                     lead=(3, 7))
    opts = dict(divergence="jsd", temperature=2.0, kd_weight=0.5, ce_weight=0.25)
    comp = kdkernels.fused_linear_kd_loss(inp["h"], inp["w"], inp["g"], inp["u"], inp["labels"],
                                          return_components=True, **opts)
    assert isinstance(comp, kdkernels.KDComponents)
    kept = int((inp["labels"] != -100).sum())
    assert int(comp.n_tokens) == kept
    torch.testing.assert_close(comp.loss, 0.5 * 4.0 * comp.kd + 0.25 * comp.ce)
    module = kdkernels.FusedLinearKDLoss(**opts)
    torch.testing.assert_close(module(inp["h"], inp["w"], inp["g"], inp["u"], inp["labels"]),
                               comp.loss)
    none = kdkernels.fused_linear_kd_loss(inp["h"], inp["w"], inp["g"], inp["u"],
                                          inp["labels"], reduction="none", **opts)
    assert none.shape == (3, 7)
    assert (none[inp["labels"] == -100] == 0).all()


def test_gradient_accumulation_with_num_items():
    """Two micro-batches with num_items = total kept tokens equal one big batch."""
    inp = make_fused(16, 70, 70, 8, 8, torch.float32, ignore_frac=0.25, seed=10)
    full = run_fused(kdkernels.fused_linear_kd_loss, inp, ce_weight=0.3)
    total = int((inp["labels"] != -100).sum())
    h = inp["h"].detach().clone().requires_grad_()
    w = inp["w"].detach().clone().requires_grad_()
    acc = 0.0
    for part in (slice(0, 9), slice(9, 16)):
        loss = kdkernels.fused_linear_kd_loss(h[part], w, inp["g"][part], inp["u"],
                                              inp["labels"][part], ce_weight=0.3,
                                              num_items=total)
        loss.backward()
        acc = acc + loss.detach()
    torch.testing.assert_close(acc, full[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h.grad, full[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, full[2], rtol=1e-5, atol=1e-7)


def test_workspace_budget_bounds_chunk_rows():
    """The planner takes the fewest chunks that fit the budget, balanced; each assertion
    would fail for a planner that always answered 1 row, or always the budget's maximum."""
    from kdkernels.backends import torch_rows
    from kdkernels.engine.chunking import balanced_rows, plan_chunks, rows_for_budget

    cpu = torch.device("cpu")
    # 1 MiB at 32000 columns x 8 bytes holds 4 rows: 10 rows -> 3 chunks of 4, 4, 2
    # -> balanced to chunks of 4 (the fewest chunks is 3: ceil(10 / 3) = 4).
    assert rows_for_budget(1 << 20, 32_000, 8) == 4
    assert balanced_rows(10, 4) == 4
    # 11 rows at most 4 per chunk: 3 chunks, balanced to 4, 4, 3 (not 4, 4, 4 - 1).
    assert balanced_rows(11, 4) == 4 and balanced_rows(9, 4) == 3 and balanced_rows(9, 100) == 9
    plan = lambda **kw: plan_chunks(**{**dict(  # noqa: E731
        n_rows=1000, width=1000, backend=torch_rows.BACKEND, logits_dtype=torch.float32,
        grad_dtype=torch.float32, device=cpu, budget=8 * 1000 * 100), **kw})
    # torch on CPU: 8 bytes per logit (two fp32 [C, V] inputs) -> 100 rows, 10 chunks.
    assert plan().rows == 100 and plan().dz_layout == "in_place"
    assert plan(n_rows=1001).rows == 91  # 11 chunks of <= 100, balanced: 1001 / 11
    assert plan(chunk_size=7).rows == 7 and plan(chunk_size=5000).rows == 1000
    # dL/dz of another dtype: a buffer of its own (2 more bytes per logit -> at most 80
    # rows, 13 chunks balanced to 77), or packed over the fp32 logits when the backend
    # accepts it (no extra bytes).
    own = plan(grad_dtype=torch.bfloat16)
    assert (own.rows, own.dz_layout) == (77, "own")
    packing = dataclasses.replace(torch_rows.BACKEND, packed_grad_min_rows=lambda d: 50)
    packed = plan(grad_dtype=torch.bfloat16, backend=packing)
    assert (packed.rows, packed.dz_layout) == (100, "packed")
    too_few = plan(grad_dtype=torch.bfloat16, backend=packing, budget=8 * 1000 * 40)
    assert too_few.dz_layout == "own"  # 40 rows < 50: packing would idle the device
    # staging per row counts against the budget too
    assert plan(bytes_per_row=2000).rows == 77
    assert plan(grad_dtype=None).dz_layout == "in_place"
