"""The Amari alpha-divergence: its limits, its sign and zero, every backend against the
float64 oracle, and the paths that must carry it (kd_loss, torch.compile)."""

from __future__ import annotations

import pytest
import torch

import kdkernels
from kdkernels.reference import reference_fused_linear_kd_loss, reference_kd_loss

from ._helpers import make_fused, rel_err, run_fused
from .conftest import cpu_impls


def _logits(n=7, v=301, scale=3.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=gen, dtype=torch.float64) * scale
    zt = torch.randn(n, v, generator=gen, dtype=torch.float64) * scale
    return zs.to(dtype), zt.to(dtype)


def _rows(impl, zs, zt, alpha, div="alpha", **kw):
    return kdkernels.kd_loss(zs, zt, divergence=div, alpha=alpha, reduction="none",
                             impl=impl, **kw)


@pytest.mark.parametrize("end", ["one", "zero"])
def test_limits_are_the_two_kls(end):
    """D_alpha -> KL(q||p) as alpha -> 1 and KL(p||q) as alpha -> 0; the gap shrinks like
    |1 - alpha| (resp. alpha): first order in the distance to the end."""
    zs, zt = _logits()
    kl = _rows("torch", zs, zt, 0.5, "forward_kl" if end == "one" else "reverse_kl",
               temperature=1.3)
    gaps = []
    for eps in (1e-2, 1e-3, 1e-4):
        a = 1 - eps if end == "one" else eps
        got = _rows("torch", zs, zt, a, temperature=1.3)  # float64 through the torch backend
        ref = reference_kd_loss(zs, zt, divergence="alpha", alpha=a, temperature=1.3,
                                reduction="none")["loss"]
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
        gaps.append(float((got - kl).abs().max() / kl.abs().max()))
    # at logit scale 3 the first-order coefficient is ~4: gap ~ 4 eps
    assert gaps[2] < 1e-3 and gaps[1] < gaps[0] / 5 and gaps[2] < gaps[1] / 5, gaps


@pytest.mark.parametrize("impl", cpu_impls())
def test_fp32_backends_near_the_ends(impl):
    zs, zt = _logits(dtype=torch.float32)
    for alpha, kl in ((1 - 1e-3, "forward_kl"), (1e-3, "reverse_kl")):
        got = _rows(impl, zs, zt, alpha)
        ref = reference_kd_loss(zs.double(), zt.double(), divergence="alpha", alpha=alpha,
                                reduction="none")["loss"]
        # D = c0 / (alpha (1 - alpha)): fp32 sums good to ~1e-7 absolute, divided by ~1e-3
        assert rel_err(got, ref) < 1e-3
        # and the limit: exact gap ~4e-3 at this logit scale
        assert rel_err(got, _rows(impl, zs, zt, 0.5, kl)) < 1e-2


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonnegative_and_exactly_zero_when_equal(impl, dtype):
    zs, zt = _logits(dtype=dtype)
    for alpha in (0.5, 0.01, 0.99):
        assert (_rows(impl, zs, zt, alpha, temperature=1.7) >= 0).all()
        same = _rows(impl, zs, zs.clone(), alpha, temperature=1.7, student_softcap=20.0,
                     teacher_softcap=20.0)
        assert (same == 0).all(), same  # term by term p + alpha (q - p) - w = 0 exactly


@pytest.mark.parametrize("impl", cpu_impls())
def test_masked_vocabulary_gives_finite_loss_and_gradient(impl):
    zs, zt = _logits(dtype=torch.float32)
    zs[:, :10] = float("-inf")  # student mass 0 where the teacher has some
    zt[:, 5:20] = float("-inf")  # and the other way round
    zs.requires_grad_()
    loss = kdkernels.kd_loss(zs, zt, divergence="alpha", alpha=0.3, impl=impl)
    loss.backward()
    ref_zs = zs.detach().double().requires_grad_()
    ref = reference_kd_loss(ref_zs, zt.double(), divergence="alpha", alpha=0.3)["loss"]
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
    assert abs(float(loss) - float(ref)) <= 1e-5 * float(ref)
    # columns with no student mass get no gradient; the oracle's autograd gives NaN there
    assert (zs.grad[:, :10] == 0).all()
    assert rel_err(zs.grad[:, 10:], ref_zs.grad[:, 10:]) <= 1e-5


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("alpha", [0.5, 0.1, 0.9])
def test_fused_matches_oracle(impl, alpha):
    inp = make_fused(29, 257, 257, 16, 24, torch.float32, bias=True, ignore_frac=0.25, seed=9)
    opts = dict(divergence="alpha", alpha=alpha, temperature=1.6, ce_weight=0.3,
                chunk_size=8)
    ours = run_fused(kdkernels.fused_linear_kd_loss, inp, impl=impl, **opts)
    ref = run_fused(reference_fused_linear_kd_loss, inp, **opts)
    # fp32 logits of 16/24-term products, fp32 row math: 1e-5 norm-wise (the gradient's
    # k_div = -1 / alpha scales rounding by 10 at alpha 0.1, still below 1e-5 here)
    for what, a, b in zip(("loss", "grad_h", "grad_w", "grad_bias"), ours, ref, strict=True):
        assert rel_err(a, b) <= 1e-5, f"{what}: {rel_err(a, b):.3g}"


def test_gradient_matches_float64_autograd():
    zs, zt = _logits(n=5, v=97)
    zs.requires_grad_()
    loss = kdkernels.kd_loss(zs, zt, divergence="alpha", alpha=0.35, temperature=0.8,
                             impl="torch")  # float64 end to end
    (g,) = torch.autograd.grad(loss, zs)
    ref = reference_kd_loss(zs, zt, divergence="alpha", alpha=0.35, temperature=0.8)["loss"]
    (g_ref,) = torch.autograd.grad(ref, zs)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-13)


def test_gradcheck_float64():
    zs, zt = _logits(n=3, v=11)
    zs.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: kdkernels.kd_loss(z, zt, divergence="alpha", alpha=0.7, temperature=1.5,
                                    impl="torch"), (zs,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_match_oracle(impl, dtype):
    """alpha on the GPU backends (fp32-output GEMMs for bf16, packed dL/dz where taken)."""
    inp = make_fused(300, 4099, 4099, 64, 96, dtype, bias=True, ignore_frac=0.2, seed=11)
    inp = {k: None if v is None else v.detach().cuda().requires_grad_(v.requires_grad)
           for k, v in inp.items()}
    opts = dict(divergence="alpha", alpha=0.3, temperature=1.4, ce_weight=0.2)
    ours = run_fused(kdkernels.fused_linear_kd_loss, inp, impl=impl, **opts)
    ref = run_fused(reference_fused_linear_kd_loss, inp, **opts)
    # fp32: fp32 GEMMs and row math, 1e-4 norm-wise (TF32 is off by default); bf16: inputs
    # and gradients rounded to bf16 (2^-8 per value), a few of them compounding
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for what, a, b in zip(("loss", "grad_h", "grad_w", "grad_bias"), ours, ref, strict=True):
        assert rel_err(a, b) <= tol, f"{what}: {rel_err(a, b):.3g}"
    same = kdkernels.kd_loss(inp["h"].detach() @ inp["w"].detach().t(),
                             inp["h"].detach() @ inp["w"].detach().t(), divergence="alpha",
                             reduction="none", impl=impl)
    assert (same == 0).all()
