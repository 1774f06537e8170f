"""Memory behaviour that needs no GPU to check: gradients are handed to autograd without a
copy, the workspace is gone before the output-dtype gradients exist, and the allocator-trace
replay of the GPU benchmark's peak breakdown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import kdkernels
from kdkernels.engine import driver

from .conftest import cpu_impls

ROOT = Path(__file__).resolve().parent.parent


def _inputs(seed=0, n=37, vocab=211, ds=16, dt=24, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, ds, generator=gen).to(dtype).requires_grad_(True)
    w = torch.randn(vocab, ds, generator=gen).to(dtype).requires_grad_(True)
    g = torch.randn(n, dt, generator=gen).to(dtype)
    u = torch.randn(vocab, dt, generator=gen).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, g, u, labels


@pytest.mark.parametrize("impl", cpu_impls())
def test_fused_gradients_are_adopted_not_cloned(impl):
    # A second reference held by the Function would make AccumulateGrad clone the [V, D]
    # gradient: one more weight-sized buffer at the memory peak.
    h, w, g, u, labels = _inputs()
    loss = kdkernels.fused_linear_kd_loss(h, w, g, u, labels, impl=impl, chunk_size=8)
    ptrs = [t.data_ptr() for t in loss.grad_fn.saved_tensors[:2]]
    loss.backward()
    assert [h.grad.data_ptr(), w.grad.data_ptr()] == ptrs


def test_kd_loss_gradient_is_adopted_not_cloned():
    zs = torch.randn(13, 101, requires_grad=True)
    zt = torch.randn(13, 101)
    loss = kdkernels.kd_loss(zs, zt, divergence="jsd")
    ptr = loss.grad_fn.saved_tensors[0].data_ptr()
    loss.backward()
    assert zs.grad.data_ptr() == ptr


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_retain_graph_backward_twice_accumulates(reduction):
    h, w, g, u, labels = _inputs(1)
    loss = kdkernels.fused_linear_kd_loss(h, w, g, u, labels, reduction=reduction,
                                          divergence="reverse_kl")
    loss.backward(retain_graph=True)
    once = (h.grad.clone(), w.grad.clone())
    loss.backward(torch.tensor(0.5))
    torch.testing.assert_close(h.grad, 1.5 * once[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.grad, 1.5 * once[1], rtol=1e-6, atol=1e-7)


def test_fp32_weight_gradient_is_the_accumulator_and_bf16_is_one_cast(monkeypatch):
    made = []
    real = driver.torch.zeros

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        made.append((tuple(out.shape), out.dtype, out.data_ptr()))  # no reference kept
        return out

    monkeypatch.setattr(driver.torch, "zeros", spy)
    h, w, g, u, labels = _inputs(2)
    kdkernels.fused_linear_kd_loss(h, w, g, u, labels).backward()
    acc = [ptr for shape, _, ptr in made if shape == tuple(w.shape)]
    assert acc == [w.grad.data_ptr()]  # fp32: the accumulator itself becomes w.grad

    made.clear()
    hb, wb, gb, ub = (t.detach().bfloat16().requires_grad_(t.requires_grad)
                      for t in (h, w, g, u))
    kdkernels.fused_linear_kd_loss(hb, wb, gb, ub, labels).backward()
    assert [d for shape, d, _ in made if shape == tuple(w.shape)] == [torch.float32]
    assert wb.grad.dtype == torch.bfloat16  # one cast of the fp32 accumulator, no zero fill


@pytest.mark.parametrize("impl", cpu_impls())
def test_workspace_is_released_before_the_gradients_are_cast(impl, monkeypatch):
    buffers = []
    real = driver.torch.empty

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if out.dim() == 2 and out.shape[1] == 211:
            buffers.append(out)
        return out

    monkeypatch.setattr(driver.torch, "empty", spy)
    h, w, g, u, labels = _inputs(3, dtype=torch.bfloat16)
    loss = kdkernels.fused_linear_kd_loss(h, w, g, u, labels, impl=impl, chunk_size=10)
    assert buffers, "the driver allocated no [C, V] workspace"
    # even though this test still references them, their memory is gone
    assert all(b.untyped_storage().nbytes() == 0 for b in buffers)
    loss.backward()
    assert torch.isfinite(w.grad.float()).all() and w.grad.dtype == torch.bfloat16


def test_live_at_peak_replays_an_allocator_trace():
    sys.path.insert(0, str(ROOT))
    from bench.loss_cuda import live_at_peak

    def frame(name):
        return [{"filename": "/x/torch/nn.py", "line": 1, "name": "inner"},
                {"filename": f"/r/kdkernels/{name}.py", "line": 7, "name": name}]

    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frame("driver")},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frame("gemm")},
        {"action": "free_requested", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "alloc", "addr": 3, "size": 70, "frames": frame("autograd")},
        {"action": "free_requested", "addr": 99, "size": 1000},  # allocated before the trace
        {"action": "alloc", "addr": 4, "size": 10, "frames": []},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 5, "size": 20, "frames": frame("late")},
    ]
    peak, blocks = live_at_peak(trace)
    assert peak == 180
    assert blocks == [(100, "driver.py:7 driver"), (70, "autograd.py:7 autograd"), (10, "?")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_peak_is_the_model():
    """Beyond the inputs, one fwd+bwd holds at most the fp32 grad_W accumulator, the
    workspace and grad_hidden (then the bf16 grad_W replaces the workspace): no workspace
    during the cast, no clone of a gradient. Allocations, not time: deterministic."""
    n, vocab, ds, dt, budget = 4096, 65536, 1024, 2048, 256 * 2**20
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, device="cuda").mul_(std).bfloat16()

    h = rnd(n, ds).requires_grad_()
    w = rnd(vocab, ds, std=ds**-0.5).requires_grad_()
    g, u = rnd(n, dt), rnd(vocab, dt, std=dt**-0.5)
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=gen)

    def call():
        h.grad = w.grad = None
        kdkernels.fused_linear_kd_loss(h, w, g, u, labels, max_workspace_bytes=budget
                                       ).backward()

    call()  # warm-up: kernels, cuBLAS workspace
    h.grad = w.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    model = vocab * ds * 4 + budget + n * ds * 2  # accumulator + workspace + grad_hidden
    slack = 64 * 2**20  # per-chunk rows/labels/stats vectors, allocator rounding
    assert extra <= model + slack, f"{extra / 2**20:.0f} MiB > {(model + slack) / 2**20:.0f}"


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an aten op returns in fresh memory (not a view of,
    or an out= into, one of its arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.fixture(params=["native_half_gemm", "fp32_gemm"])
def cpu_kind(request, monkeypatch):
    """Both kinds of build machine on any machine: a CPU with native bf16 GEMMs (AVX512-BF16,
    AMX) runs the chunk GEMMs in bf16; one without (AVX2-only EPYC) runs them in fp32."""
    from kdkernels.engine import gemm

    monkeypatch.setenv("KDKERNELS_CPU_HALF_GEMM", "1" if request.param == "native_half_gemm"
                       else "0")
    gemm.cpu_has_fast_half_gemm.cache_clear()
    yield request.param
    gemm.cpu_has_fast_half_gemm.cache_clear()


@pytest.mark.parametrize("impl", cpu_impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ignored_labels_copy_no_hidden_states(impl, dtype, cpu_kind):
    """Prompt-masked distillation (ignored rows) walks the kept rows a chunk at a time: no
    [kept, D] copy of either hidden state and no second hidden gradient, only chunk-sized
    staging and the [N, Ds] gradient itself.

    The rule holds on every kind of CPU: where bf16 GEMMs run in fp32 (no native half GEMMs),
    grad_hidden is still one [N, Ds] tensor in the input's dtype, written a chunk at a time
    from chunk-sized fp32 staging, never an fp32 [N, Ds] accumulator cast at the end."""
    n, chunk = 37, 8
    h, w, g, u, labels = _inputs(4, n=n, dtype=dtype)
    labels[::3] = -100
    kept = int((labels != -100).sum())
    with _Allocations() as seen:
        loss = kdkernels.fused_linear_kd_loss(h, w, g, u, labels, impl=impl, chunk_size=chunk,
                                              ce_weight=0.2)
        loss.backward()
    vocab = w.shape[0]
    hidden = [s for s in seen.shapes if len(s) == 2 and s[0] != vocab]  # not head-shaped
    for d in (h.shape[1], g.shape[1]):
        assert (kept, d) not in hidden, f"a [kept, {d}] copy of a hidden state: {hidden}"
        assert all(rows <= chunk for rows, cols in hidden if cols == d and rows != n), hidden
    assert (n, g.shape[1]) not in hidden  # the teacher's hidden states are never copied
    assert hidden.count((n, h.shape[1])) == 1, hidden  # grad_hidden, once
    assert h.grad.dtype == dtype
    # and the result is the oracle's (the gathered rows are the right ones)
    from kdkernels.reference import reference_fused_linear_kd_loss

    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = reference_fused_linear_kd_loss(h64, w64, g.double(), u.double(), labels,
                                         ce_weight=0.2)["loss"]
    ref.backward()
    # fp32: 1e-5 covers the fp32 row math; bf16: GEMMs and gradients in bf16 (2^-8 per value)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(float(loss) - float(ref)) <= tol * abs(float(ref))
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=tol, atol=tol * 0.1)
    assert not h.grad[labels == -100].any()


@pytest.mark.parametrize("impl", cpu_impls())
def test_bf16_hidden_gradient_is_one_tensor_on_every_cpu_kind(impl, cpu_kind):
    """Without ignored rows too: one [N, Ds] bf16 gradient, whatever dtype the GEMMs run in."""
    n = 29
    h, w, g, u, labels = _inputs(5, n=n, dtype=torch.bfloat16)
    with _Allocations() as seen:
        kdkernels.fused_linear_kd_loss(h, w, g, u, labels, impl=impl, chunk_size=8).backward()
    assert [s for s in seen.shapes if s == (n, h.shape[1])] == [(n, h.shape[1])], seen.shapes
    assert h.grad.dtype == torch.bfloat16
    h64 = h.detach().double().requires_grad_()
    from kdkernels.reference import reference_fused_linear_kd_loss

    reference_fused_linear_kd_loss(h64, w.detach().double(), g.double(), u.double(),
                                   labels)["loss"].backward()
    # bf16 inputs: the gradient is rounded to bf16 once (2^-8 relative) after bf16 or fp32 GEMMs
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=2e-2, atol=2e-3)
