"""The alpha-divergence gradient is exactly 0 where the student equals the teacher, on every
backend: G = k_div ((w - p) + p c0) with w - p = p expm1(alpha (log q - log p)) and c0 the
exact mix sum, where w - p sum w cancelled to eps / alpha (7e-5 at alpha 1e-4 in fp32)."""

from __future__ import annotations

import pytest
import torch

import kdkernels

from .conftest import cpu_impls


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("alpha", [1e-4, 0.3, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradient_is_exactly_zero_at_q_equal_p(impl, alpha, dtype, temperature):
    gen = torch.Generator().manual_seed(7)
    z = (torch.randn(9, 307, generator=gen) * 4).to(dtype)
    zs = z.clone().requires_grad_()
    loss = kdkernels.kd_loss(zs, z.clone(), divergence="alpha", alpha=alpha,
                             temperature=temperature, impl=impl)
    loss.backward()
    assert float(loss) == 0.0
    assert torch.equal(zs.grad, torch.zeros_like(zs.grad)), zs.grad.abs().max()


@pytest.mark.parametrize("impl", cpu_impls())
def test_fused_gradient_is_exactly_zero_for_the_teachers_own_head(impl):
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(13, 24, generator=gen)
    w = torch.randn(211, 24, generator=gen)
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    kdkernels.fused_linear_kd_loss(hs, ws, h, w, divergence="alpha", alpha=1e-4, impl=impl,
                                   chunk_size=5).backward()
    assert not hs.grad.any() and not ws.grad.any()


@pytest.mark.parametrize("impl", cpu_impls())
def test_gradient_away_from_q_equal_p_is_the_oracles(impl):
    """The far branch (|alpha (log q - log p)| >= 1) and the near one agree with float64."""
    from kdkernels.reference import reference_kd_loss

    gen = torch.Generator().manual_seed(9)
    zs = torch.randn(11, 263, generator=gen) * 3
    zt = torch.randn(11, 263, generator=gen) * 3  # log-ratios of several nats: both branches
    zs[:, :40] = zt[:, :40] + 0.1 * torch.randn(11, 40, generator=gen)
    for alpha in (0.2, 0.7):
        x = zs.clone().requires_grad_()
        kdkernels.kd_loss(x, zt, divergence="alpha", alpha=alpha, impl=impl).backward()
        x64 = zs.double().requires_grad_()
        reference_kd_loss(x64, zt.double(), divergence="alpha", alpha=alpha)["loss"].backward()
        # fp32 row math: log-probs of a few nats carry ~1e-6 absolute error, times 1/alpha
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=2e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_gradient_is_exactly_zero_at_q_equal_p(impl, dtype):
    """The expm1 path of the compiled Triton and CUDA kernels (gpu_check.sh runs -m gpu)."""
    gen = torch.Generator().manual_seed(7)
    z = (torch.randn(9, 4099, generator=gen) * 4).to(dtype).cuda()
    zs = z.clone().requires_grad_()
    kdkernels.kd_loss(zs, z.clone(), divergence="alpha", alpha=1e-4, temperature=2.5,
                      impl=impl).backward()
    assert torch.equal(zs.grad, torch.zeros_like(zs.grad)), zs.grad.abs().max()
