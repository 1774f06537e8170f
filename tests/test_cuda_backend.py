"""The cuda backend (csrc/rows_cuda.cu): it compiles and registers wherever a CUDA toolkit is
present (CI, CPU-only), and on a GPU it matches the torch reference backend op by op."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from kdkernels.backends import extension as _build
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
CSRC = Path(__file__).resolve().parents[1] / "csrc"
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


def _code(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _function_body(text: str, name: str) -> str | None:
    m = re.search(rf"\b{name}\s*\([^;{{]*\)\s*\{{", text)
    if not m:
        return None
    depth, i = 1, m.end()
    while depth and i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[m.end():i - 1]


def launch_check_problems(cu_source: str) -> list[str]:
    """What rows_cuda.cu gets wrong about launch and query errors (empty: nothing).

    Every ``<<<`` launch must be followed, as its very next statement, by one that keeps the
    result of cudaGetLastError() (returned or assigned, never discarded); and the SM-count
    query of cuda_blocks_per_row must not fall back to a guessed count (an integer literal
    of two or more digits, or any nonzero literal assigned to the queried variable)."""
    text = _code(cu_source)
    problems = []
    for m in re.finditer(r"<<<", text):
        end = text.index(";", text.index(">>>", m.end())) + 1
        nxt = text[end:text.find(";", end) + 1]
        line = text.count("\n", 0, m.start()) + 1
        name = re.findall(r"(\w+)\s*$", text[:m.start()])
        what = f"launch of {name[-1] if name else '?'} (line {line})"
        if "<<<" in nxt or not re.search(r"(return|=)\s*cudaGetLastError\s*\(\s*\)", nxt):
            problems.append(f"{what} is not followed by a kept cudaGetLastError(): "
                            f"{' '.join(nxt.split())[:80]!r}")
    body = _function_body(text, "cuda_blocks_per_row")
    if body is None:
        problems.append("no cuda_blocks_per_row")
        return problems
    query = re.search(r"cudaDeviceGetAttribute\s*\(\s*&\s*(\w+)", body)
    if query is None:
        problems.append("cuda_blocks_per_row does not query the SM count")
    else:
        var = query.group(1)
        for assign in re.finditer(rf"\b{var}\s*=\s*(\d+)", body):
            if int(assign.group(1)) != 0:
                problems.append(f"cuda_blocks_per_row falls back to {var} = {assign.group(1)}")
    for lit in re.findall(r"(?<![\w.])\d{2,}(?![\w.])", body):
        problems.append(f"cuda_blocks_per_row holds the constant {lit} (a guessed SM count?)")
    if not re.search(r"\bcudaError_t\s+cuda_blocks_per_row\s*\(", text):
        problems.append("cuda_blocks_per_row must return the cudaError_t of its query")
    return problems


def test_every_launch_and_the_sm_query_are_checked():
    assert launch_check_problems((CSRC / "rows_cuda.cu").read_text()) == []
    # register.cpp raises what the entry points return.
    reg = _code((CSRC / "register.cpp").read_text())
    for fn in ("cuda_row_stats", "cuda_row_mix", "cuda_row_grad"):
        calls = re.findall(rf"(\w+)\s*\(\s*{fn}\s*\(", reg)
        assert calls and set(calls) == {"C10_CUDA_CHECK"}, (fn, calls)
    assert re.search(r"cuda_blocks_per_row\([^;]*;\s*TORCH_CHECK\(\s*err\s*==\s*cudaSuccess",
                     reg), "register.cpp must TORCH_CHECK the SM-count query"


def test_launch_check_scan_finds_the_defects():
    # The scan itself, on the shapes of the defects it exists for.
    unchecked = """
    void f(cudaStream_t s) {
      k1<<<1, 32, 0, s>>>(x);
      if (n > 1) k2<<<1, 32, 0, s>>>(x);
    }
    void g() { k3<<<1, 32>>>(y); (void)cudaGetLastError(); }
    cudaError_t cuda_blocks_per_row(int64_t rows, int64_t cols, int device, int* nb) {
      int sms = 0;
      if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
        sms = 132;
      return cudaSuccess;
    }"""
    found = launch_check_problems(unchecked)
    assert sum("not followed" in p for p in found) == 3, found
    assert any("sms = 132" in p for p in found) and any("constant 132" in p for p in found)
    checked = """
    cudaError_t f(cudaStream_t s) {
      k1<<<1, 32, 0, s>>>(x);
      if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
      k2<<<1, 32, 0, s>>>(x);
      return cudaGetLastError();
    }
    cudaError_t cuda_blocks_per_row(int64_t rows, int64_t cols, int device, int* nb) {
      int sms = 0;
      cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      if (err != cudaSuccess) return err;
      *nb = rows >= 2 * sms ? 1 : 4;
      return cudaSuccess;
    }"""
    assert launch_check_problems(checked) == []


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
@pytest.mark.parametrize("div", DIVERGENCES)
def test_logit_scales(div):
    zs = make_logits(9, 2053, torch.bfloat16, DEV, scale=6.0, seed=45)
    zt = make_logits(9, 2053, torch.bfloat16, DEV, scale=6.0, seed=46)
    check_all(_backend(), zs, zt, make_labels(9, 2053, DEV),
              spec_of(div, 2.0, scap=20.0, ce=True, scale_s=3.0, scale_t=0.0625))


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
