"""Invariants of docs/design.md, gradcheck, and parity with the peers' published formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.reference import reference_kd_loss

from ._helpers import make_fused, run_fused
from .conftest import cpu_impls

DIVS = kdkernels.DIVERGENCES


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("div", DIVS)
def test_nonnegative_and_zero_when_equal(impl, div):
    zs = torch.randn(9, 257) * 4
    zt = torch.randn(9, 257) * 4
    rows = kdkernels.kd_loss(zs, zt, divergence=div, temperature=1.5, reduction="none",
                             impl=impl)
    assert (rows >= 0).all()
    same = kdkernels.kd_loss(zs, zs.clone(), divergence=div, temperature=1.5,
                             reduction="none", impl=impl)
    # Identical rows: every formula cancels exactly up to fp32 rounding of O(10) terms.
    assert same.abs().max() <= 1e-5


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("div", DIVS)
def test_gradient_rows_sum_to_zero(impl, div):
    zs = (torch.randn(11, 301) * 3).requires_grad_()
    zt = torch.randn(11, 301) * 3
    labels = torch.randint(0, 301, (11,))
    loss = kdkernels.kd_loss(zs, zt, labels, divergence=div, temperature=2.0, ce_weight=0.5,
                             reduction="sum", impl=impl)
    loss.backward()
    # Softmax gradients: each row sums to 0; fp32 sums of 301 O(1) terms err by ~1e-6.
    assert zs.grad.sum(1).abs().max() <= 1e-5 * zs.grad.abs().max() * 301**0.5


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("div", DIVS)
def test_chunk_size_invariance(impl, div):
    inp = make_fused(23, 211, 211, 16, 24, torch.float32, bias=True, ignore_frac=0.2, seed=3)
    outs = [run_fused(kdkernels.fused_linear_kd_loss, inp, divergence=div, temperature=1.7,
                      ce_weight=0.3, chunk_size=c, impl=impl) for c in (1, 5, 23, None)]
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            # Chunks change GEMM blocking only: fp32 rounding differences of ~1e-7.
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("div", DIVS)
def test_vocab_permutation_invariance(impl, div):
    inp = make_fused(13, 97, 97, 8, 12, torch.float32, bias=True, seed=5)
    perm = torch.randperm(97)
    inv = torch.argsort(perm)
    permuted = dict(inp, w=inp["w"].detach()[perm], u=inp["u"][perm],
                    bs=inp["bs"].detach()[perm], bt=inp["bt"][perm], labels=inv[inp["labels"]])
    opts = dict(divergence=div, temperature=0.7, ce_weight=0.4, impl=impl)
    base = run_fused(kdkernels.fused_linear_kd_loss, inp, **opts)
    moved = run_fused(kdkernels.fused_linear_kd_loss, permuted, **opts)
    # Reordered fp32 sums over 97 columns: a few ulps of each tensor's scale (norm-wise).
    for a, b in ((base[0], moved[0]), (base[1], moved[1]), (base[2][perm], moved[2]),
                 (base[3][perm], moved[3])):
        assert (a - b).norm() <= 1e-5 * a.norm()


@pytest.mark.parametrize("impl", cpu_impls())
def test_ignored_rows_get_zero_gradient(impl):
    inp = make_fused(17, 64, 64, 8, 8, torch.float32, ignore_frac=0.4, seed=11)
    _, gh, _, _ = run_fused(kdkernels.fused_linear_kd_loss, inp, ce_weight=1.0, impl=impl)
    ignored = inp["labels"] == -100
    assert ignored.any() and (~ignored).any()
    assert (gh[ignored] == 0).all()
    assert (gh[~ignored].abs().sum(1) > 0).all()
    # Logits path: garbage (inf/NaN) in ignored rows must not leak into loss or gradient.
    zs = torch.randn(6, 50).requires_grad_()
    zt = torch.randn(6, 50)
    labels = torch.tensor([1, -100, 3, -100, 5, 6])
    with torch.no_grad():
        zs[1] = float("nan")
        zt[3] = float("inf")
    loss = kdkernels.kd_loss(zs, zt, labels, ce_weight=0.5, impl=impl)
    loss.backward()
    assert torch.isfinite(loss)
    assert (zs.grad[1] == 0).all() and (zs.grad[3] == 0).all()


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("reduction", kdkernels.REDUCTIONS)
def test_gradcheck_float64(div, reduction):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    t_h = torch.randn(5, 3, dtype=torch.float64, generator=g)
    t_w = torch.randn(7, 3, dtype=torch.float64, generator=g)
    labels = torch.tensor([0, 6, -100, 2, 3])

    def fused(h, w, b):
        return kdkernels.fused_linear_kd_loss(h, w, t_h, t_w, labels, student_bias=b,
                                              divergence=div, temperature=1.3, ce_weight=0.4,
                                              student_softcap=3.0, reduction=reduction,
                                              chunk_size=2)

    assert torch.autograd.gradcheck(fused, (h, w, b))
    zs = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    zt = torch.randn(5, 7, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(
        lambda z: kdkernels.kd_loss(z, zt, labels, divergence=div, temperature=0.8,
                                    ce_weight=0.2, reduction=reduction, chunk_size=3), (zs,))


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's GKD generalized_jsd_loss semantics ('batchmean' over unmasked tokens)."""
    s = F.log_softmax(student_logits / temperature, -1)
    t = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        bt = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log1p(-bt), t + torch.log(bt)]), 0)
        jsd = (beta * F.kl_div(mix, t, reduction="none", log_target=True)
               + (1 - beta) * F.kl_div(mix, s, reduction="none", log_target=True))
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


def _distillm_skew(student_logits, teacher_logits, labels, lam, reverse):
    """DistiLLM's skewed_forward_kl / skewed_reverse_kl (their sign conventions)."""
    q = F.softmax(teacher_logits, -1)
    p = F.softmax(student_logits, -1)
    if reverse:
        mixed = torch.log((1 - lam) * q + lam * p)
        x = (p * mixed - p * F.log_softmax(student_logits, -1)).sum(-1)
    else:
        x = (q * torch.log(lam * q + (1 - lam) * p)).sum(-1)
    mask = (labels != -100).to(x.dtype)
    return -(x * mask).sum() / mask.sum()


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl(impl, beta):
    zs = (torch.randn(4, 6, 53, dtype=torch.float64) * 2).requires_grad_()
    zt = torch.randn(4, 6, 53, dtype=torch.float64) * 2
    labels = torch.randint(0, 53, (4, 6))
    labels[0, :2] = -100
    ref = _trl_generalized_jsd(zs, zt, labels, beta, 2.0)
    (g_ref,) = torch.autograd.grad(ref, zs)
    z32 = zs.detach().float().requires_grad_()
    ours = kdkernels.kd_loss(z32, zt.float(), labels, divergence="jsd", beta=beta,
                             temperature=2.0, scale_by_t2=False, impl=impl)
    ours.backward()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z32.grad.double(), g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_skew_matches_distillm(impl, reverse, lam):
    zs = (torch.randn(20, 41, dtype=torch.float64) * 2).requires_grad_()
    zt = torch.randn(20, 41, dtype=torch.float64) * 2
    labels = torch.randint(0, 41, (20,))
    labels[::4] = -100
    ref = _distillm_skew(zs, zt, labels, lam, reverse)
    (g_ref,) = torch.autograd.grad(ref, zs)
    z32 = zs.detach().float().requires_grad_()
    ours = kdkernels.kd_loss(z32, zt.float(), labels, skew=lam, impl=impl,
                             divergence="skew_reverse_kl" if reverse else "skew_forward_kl")
    ours.backward()
    if not reverse:
        # DistiLLM's "skewed forward KL" is the cross-entropy -sum q log(mix): it exceeds
        # the KL by the teacher entropy, which has no gradient w.r.t. the student.
        q = F.softmax(zt, -1)
        ent = -(q * q.log()).sum(-1)
        keep = labels != -100
        ref = ref - ent[keep].mean()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z32.grad.double(), g_ref, rtol=1e-4, atol=1e-7)


def test_reference_jsd_matches_trls_formula():
    """The oracle's JSD at beta in (0,1) agrees with TRL's formula (independent code)."""
    zs, zt = torch.randn(7, 30, dtype=torch.float64), torch.randn(7, 30, dtype=torch.float64)
    labels = torch.arange(7)
    ours = reference_kd_loss(zs, zt, labels, divergence="jsd", beta=0.3, temperature=1.1,
                             scale_by_t2=False)["loss"]
    torch.testing.assert_close(ours, _trl_generalized_jsd(zs, zt, labels, 0.3, 1.1))
