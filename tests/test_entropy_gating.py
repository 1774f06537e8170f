"""The student entropy (KDComponents.student_entropy) is only computed when return_components
asks for it (issue 23): RowSpec.want_entropy gates the e_a sum of the stats passes. Without
it every backend leaves e_a at exactly 0 and the other columns, the loss and the gradients
are bit for bit those of the entropy-computing passes; with it the entropy is the oracle's."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import kdkernels
from kdkernels.backends import registry
from kdkernels.layouts import SSTATS, STATS
from kdkernels.reference import reduce_rows, reference_kd_loss

from ._rowop_cases import make_labels, make_logits, spec_of
from .conftest import cpu_impls

IMPLS = cpu_impls()
# The row ops on every device here: the CUDA kernels (cuda, compiled triton) on a GPU.
ROW_CASES = [("cpu", impl) for impl in IMPLS]
if torch.cuda.is_available():
    ROW_CASES += [("cuda", impl) for impl in ("cuda", "triton")
                  if not isinstance(registry.load(impl), str)]


def _backend(impl: str):
    backend = registry.load(impl)
    assert not isinstance(backend, str), backend
    return backend


def _specs(div: str, **kw):
    on = spec_of(div, **kw)
    off = dataclasses.replace(on, consts=tuple(
        0.0 if name == "want_entropy" else c
        for name, c in zip(kdkernels.layouts.CONSTS, on.consts, strict=True)))
    assert on.want_entropy and not off.want_entropy
    return on, off


def _other(x: torch.Tensor, e_col: int) -> torch.Tensor:
    return torch.cat([x[:, :e_col], x[:, e_col + 1:]], 1)


@pytest.fixture
def vocab_split(monkeypatch):
    """Force the vocab-split path (partials and their merge) where a backend has one."""
    from kdkernels.backends import triton_rows

    monkeypatch.setitem(triton_rows.OVERRIDE, "n_split", 3)
    monkeypatch.setitem(triton_rows.OVERRIDE, "block_v", 64)


@pytest.mark.parametrize("device,impl", ROW_CASES)
# 2 rows: cpp and cuda split the vocabulary (the fixture makes triton split it)
@pytest.mark.parametrize("rows,cols", [(7, 300), (2, 20000)])
@pytest.mark.parametrize("div,temperature", [("forward_kl", 1.0), ("reverse_kl", 2.0)])
def test_stats_skip_entropy(device, impl, rows, cols, div, temperature, request):
    if impl == "triton" and rows == 2:
        request.getfixturevalue("vocab_split")
    backend = _backend(impl)
    on, off = _specs(div, temperature=temperature, ce=True, scap=20.0)
    zs = make_logits(rows, cols, torch.bfloat16, device, seed=3)
    zt = make_logits(rows, cols, torch.bfloat16, device, seed=4)
    labels = make_labels(rows, cols, device)
    with_e = backend.stats(zs, zt, labels, on)
    without = backend.stats(zs, zt, labels, off)
    assert (with_e[:, STATS.e_a] != 0).all()  # computed: nonzero for these logits
    assert torch.equal(without[:, STATS.e_a].cpu(), torch.zeros(rows))  # skipped: left at 0
    assert torch.equal(_other(with_e, STATS.e_a), _other(without, STATS.e_a))


@pytest.mark.parametrize("device,impl", ROW_CASES)
@pytest.mark.parametrize("rows,cols", [(5, 300), (2, 20000)])
def test_student_stats_skip_entropy(device, impl, rows, cols, request):
    if impl == "triton" and rows == 2:
        request.getfixturevalue("vocab_split")
    backend = _backend(impl)
    on, off = _specs("forward_kl", temperature=1.5, ce=True)
    zs = make_logits(rows, cols, torch.float32, device, seed=5).contiguous()
    zs[:, ::7] = -math.inf  # masked columns (the teacher's ids)
    with_e = backend.student_stats(zs, on)
    without = backend.student_stats(zs, off)
    assert (with_e[:, SSTATS.e_a] != 0).all()
    assert torch.equal(without[:, SSTATS.e_a].cpu(), torch.zeros(rows))
    assert torch.equal(_other(with_e, SSTATS.e_a), _other(without, SSTATS.e_a))


@pytest.fixture
def spy():
    """``spy(impl)``: the name of a hidden backend wrapping ``impl`` whose stats passes record
    what they return, and that record."""
    names = []

    def make(impl: str):
        base = _backend(impl)
        seen = {"stats": [], "student_stats": [], "specs": []}

        def stats(zs, zt, labels, spec):
            out = base.stats(zs, zt, labels, spec)
            seen["stats"].append(out[:, STATS.e_a].clone())
            seen["specs"].append(spec)
            return out

        def student_stats(zs, spec):
            out = base.student_stats(zs, spec)
            seen["student_stats"].append(out[:, SSTATS.e_a].clone())
            seen["specs"].append(spec)
            return out

        name = f"entropy_spy_{impl}"
        registry.register(name, backend=dataclasses.replace(
            base, name=name, stats=stats, student_stats=student_stats), listed=False)
        names.append(name)
        return name, seen

    yield make
    for name in names:
        registry._MODULES.pop(name, None)
        registry._loaded.pop(name, None)
        registry._HIDDEN.discard(name)


def _dense_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    zs = (torch.randn(2, 5, 257, generator=gen) * 3).to(torch.bfloat16)
    zt = (torch.randn(2, 5, 257, generator=gen) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 257, (2, 5), generator=gen)
    labels[0, 1] = -100
    return zs, zt, labels


def _topk_case(seed=0, k=6):
    gen = torch.Generator().manual_seed(seed)
    zs = torch.randn(9, 300, generator=gen) * 3
    zt = torch.randn(9, 300, generator=gen) * 3
    lp, ids = torch.log_softmax(zt, -1).topk(k, -1)
    labels = torch.randint(0, 300, (9,), generator=gen)
    labels[2] = -100
    return zs, ids, lp, labels


DENSE_OPTS = dict(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5,
                  student_softcap=25.0)
TOPK_OPTS = dict(temperature=1.5, ce_weight=0.5, student_softcap=25.0)


def _run(fn, zs):
    """(fn's result, its loss detached, d(sum of the loss)/dzs)."""
    zs = zs.clone().requires_grad_()
    out = fn(zs)
    loss = out.loss if isinstance(out, kdkernels.KDComponents) else out
    loss.sum().backward()
    return out, loss.detach(), zs.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dense_loss_gates_entropy(impl, reduction, spy):
    name, seen = spy(impl)
    zs, zt, labels = _dense_case()
    # reduction="none": the backward re-runs the rows with per-row weights
    opts = dict(DENSE_OPTS, impl=name, reduction=reduction)
    _, loss_off, grad_off = _run(lambda z: kdkernels.kd_loss(z, zt, labels, **opts), zs)
    assert seen["specs"] and not any(s.want_entropy for s in seen["specs"])
    assert all(torch.equal(e, torch.zeros_like(e)) for e in seen["stats"])
    seen["specs"].clear()
    comps, loss_on, grad_on = _run(lambda z: kdkernels.kd_loss(
        z, zt, labels, return_components=True, **opts), zs)
    assert seen["specs"][0].want_entropy  # the forward's stats pass
    # the same loss and gradients, bit for bit
    assert torch.equal(loss_off, loss_on)
    assert torch.equal(grad_off, grad_on)
    ref = reference_kd_loss(zs, zt, labels, **DENSE_OPTS, reduction=reduction)
    want = reduce_rows(ref["student_entropy"], ref["kept"], reduction).reshape(
        comps.student_entropy.shape)
    err = (comps.student_entropy.double() - want).abs().max().item()
    assert err <= 1e-5 * math.log(257), err


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_loss_gates_entropy(impl, spy):
    name, seen = spy(impl)
    zs, ids, lp, labels = _topk_case()
    opts = dict(TOPK_OPTS, impl=name)
    _, loss_off, grad_off = _run(lambda z: kdkernels.topk_kd_loss(z, ids, lp, labels, **opts),
                                 zs)
    assert seen["student_stats"] and not any(s.want_entropy for s in seen["specs"])
    assert all(torch.equal(e, torch.zeros_like(e)) for e in seen["student_stats"])
    seen["specs"].clear()
    comps, loss_on, grad_on = _run(lambda z: kdkernels.topk_kd_loss(
        z, ids, lp, labels, return_components=True, **opts), zs)
    assert all(s.want_entropy for s in seen["specs"])
    assert torch.equal(loss_off, loss_on)
    assert torch.equal(grad_off, grad_on)
    ref = reference_kd_loss(zs, zs, labels, temperature=1.5, student_softcap=25.0)
    want = reduce_rows(ref["student_entropy"], ref["kept"])
    err = (comps.student_entropy.double() - want).abs().item()
    assert err <= 1e-5 * math.log(300), err


def test_fused_linear_gates_entropy(spy):
    """The fused path shares the row code; one backend suffices for its wiring."""
    name, seen = spy("torch")
    gen = torch.Generator().manual_seed(1)
    h, g = torch.randn(6, 16, generator=gen), torch.randn(6, 12, generator=gen)
    w, u = torch.randn(200, 16, generator=gen), torch.randn(200, 12, generator=gen)
    labels = torch.randint(0, 200, (6,), generator=gen)
    outs = []
    for comps in (False, True):
        hh = h.clone().requires_grad_()
        out = kdkernels.fused_linear_kd_loss(hh, w, g, u, labels, impl=name, ce_weight=0.5,
                                             temperature=2.0, return_components=comps)
        loss = out.loss if comps else out
        loss.backward()
        outs.append((loss.detach(), hh.grad, out))
        assert all(s.want_entropy == comps for s in seen["specs"])
        if not comps:
            assert all(torch.equal(e, torch.zeros_like(e)) for e in seen["stats"])
        seen["specs"].clear()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    ref = reference_kd_loss(h @ w.T, g @ u.T, labels, temperature=2.0)
    want = reduce_rows(ref["student_entropy"], ref["kept"])
    assert abs(outs[1][2].student_entropy.item() - want.item()) <= 1e-5 * math.log(200)
