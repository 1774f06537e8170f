"""The cuda backend (csrc/rows_cuda.cu): it compiles and registers wherever a CUDA toolkit is
present (CI, CPU-only), and on a GPU it matches the torch reference backend op by op."""

from __future__ import annotations

import math

import pytest
import torch

from kdkernels import _build
from tests._rowop_cases import (
    DIVERGENCES,
    check_all,
    check_grad,
    check_stats,
    coefficients,
    make_labels,
    make_logits,
    spec_of,
)

OPS = ("row_stats", "row_mix", "row_grad_")
HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.gpu


def _toolkit_missing() -> str | None:
    if _build._env_flag("KDKERNELS_SKIP_CUDA"):
        return "KDKERNELS_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if _build.find_cuda_home() is None:
        return "no CUDA toolkit (nvcc with libcudart) found"
    return None


def test_cuda_ops_compile_and_register_when_a_toolkit_is_present():
    why = _toolkit_missing()
    if why:
        pytest.skip(f"cannot build the CUDA extension here: {why}")
    lib = _build.load_cuda()
    assert lib.exists()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kdkernels::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kdkernels::{op}", "CPU"), op


def test_cuda_backend_says_why_without_a_device():
    from kdkernels.backends import registry

    backend = registry.load("cuda")
    if HAS_GPU:
        assert not isinstance(backend, str), backend
    else:
        assert isinstance(backend, str) and "no CUDA device" in backend


def _backend():
    from kdkernels.backends import registry

    backend = registry.load("cuda")
    assert not isinstance(backend, str), backend
    return backend


needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
DEV = "cuda"
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float16), (torch.bfloat16, torch.float32)]


@gpu
@needs_gpu
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}"[6:])
@pytest.mark.parametrize("rows,cols", [(1, 50000), (3, 4099), (300, 2048), (2, 8)])
def test_matches_torch(div, dtypes, rows, cols):
    # (1, 50000) and (3, 4099) take the vocab-split grid; odd widths the unaligned path.
    zs = make_logits(rows, cols, dtypes[0], DEV, seed=41)
    zt = make_logits(rows, cols, dtypes[1], DEV, seed=42)
    check_all(_backend(), zs, zt, make_labels(rows, cols, DEV), spec_of(div, 1.0, ce=True))


@gpu
@needs_gpu
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("temperature,scap,tcap", [(2.5, 30.0, 20.0), (0.5, None, None)])
def test_temperatures_and_softcaps(div, temperature, scap, tcap):
    zs = make_logits(17, 3001, torch.bfloat16, DEV, scale=8.0, seed=43)
    zt = make_logits(17, 3001, torch.bfloat16, DEV, scale=8.0, seed=44)
    check_all(_backend(), zs, zt, make_labels(17, 3001, DEV),
              spec_of(div, temperature, scap=scap, tcap=tcap, ce=True))


@gpu
@needs_gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_strided_rows_separate_out_and_aliasing(out_dtype):
    zs = make_logits(9, 4000, torch.bfloat16, DEV, row_stride=4104, seed=45)  # aligned rows
    zt = make_logits(9, 4000, torch.float32, DEV, row_stride=4003, seed=46)  # unaligned rows
    spec = spec_of("jsd", 1.5, ce=True)
    check_all(_backend(), zs, zt, make_labels(9, 4000, DEV), spec, out_dtype=out_dtype)
    zs = make_logits(9, 4000, out_dtype, DEV, seed=47)
    check_all(_backend(), zs, zt, make_labels(9, 4000, DEV), spec, alias=True)


@gpu
@needs_gpu
def test_garbage_rows_zero_and_nan_rows_propagate():
    backend = _backend()
    zs = make_logits(4, 5000, torch.float32, DEV, seed=48).clone()
    zt = make_logits(4, 5000, torch.float32, DEV, seed=49).clone()
    zs[1] = math.nan
    zs[2, 77] = math.inf
    zs[3, 10] = math.nan
    labels = make_labels(4, 5000, DEV)
    spec = spec_of("reverse_kl", 1.0, ce=True)
    stats = check_stats(backend, zs, zt, labels, spec)
    coef = coefficients(stats, dead_rows=(1, 2))
    out = check_grad(backend, zs, zt, labels, coef, spec)
    assert (out[[1, 2]] == 0).all() and torch.isnan(out[3]).all() and torch.isfinite(out[0]).all()


@gpu
@needs_gpu
def test_cuda_and_cpp_agree():
    from kdkernels.backends import registry

    cpp = registry.load("cpp")
    assert not isinstance(cpp, str), cpp
    zs = make_logits(6, 7001, torch.bfloat16, "cpu", seed=50)
    zt = make_logits(6, 7001, torch.bfloat16, "cpu", seed=51)
    labels = make_labels(6, 7001, "cpu")
    spec = spec_of("skew_forward_kl", 2.0, ce=True)
    got = _backend().stats(zs.to(DEV), zt.to(DEV), labels.to(DEV), spec).cpu()
    want = cpp.stats(zs, zt, labels, spec)
    torch.testing.assert_close(got, want, rtol=3e-5, atol=1e-6)


def test_arch_list_env_is_validated(monkeypatch):
    monkeypatch.setenv("KDKERNELS_CUDA_ARCH", "sm_90")
    with pytest.raises(ImportError, match="look like 9.0a or 8.0"):
        _build.cuda_archs()
    monkeypatch.setenv("KDKERNELS_CUDA_ARCH", "9.0a; 8.0")
    assert _build.cuda_archs() == ["9.0a", "8.0"]
