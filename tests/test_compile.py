"""Both losses under torch.compile(fullgraph=True): one opaque custom op each, same numbers."""

from __future__ import annotations

import pytest
import torch
import torch._functorch.config

import kdkernels

from .conftest import cpu_impls

# The Triton interpreter adds nothing here beyond the eager tests and is slow.
IMPLS = [i for i in cpu_impls() if i != "triton"]


@pytest.fixture(autouse=True)
def _no_autograd_cache():
    """AOTAutograd's on-disk cache keys on the forward graph, which holds the opaque op but
    not its registered backward: an edited backward formula would be served stale (seen:
    a broken per-row scaling passed from a warm cache). The FX graph cache stays on."""
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("reduction", "divergence"), [("mean", "jsd"), ("none", "jsd"),
                                                       ("mean", "alpha")])
def test_fullgraph_matches_eager(impl, reduction, divergence):
    torch._dynamo.reset()
    h = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(301, 16, requires_grad=True)
    b = torch.randn(301, requires_grad=True)
    g, u = torch.randn(3, 5, 24), torch.randn(301, 24)
    labels = torch.randint(0, 301, (3, 5))
    labels[0, :2] = -100

    def loss_fn(h, w, b, g, u, labels):
        out = kdkernels.fused_linear_kd_loss(h, w, g, u, labels, student_bias=b,
                                             divergence=divergence, alpha=0.3,
                                             temperature=2.0, ce_weight=0.3,
                                             student_logit_scale=0.5, teacher_logit_scale=3.0,
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


# kd_loss on materialised logits: the kdkernels::kd_loss op.

def _logits(shape, vs, vt, dtype=torch.float32, seed=0):
    """Student [*shape, vs] (requires grad) and teacher [*shape, vt] logits with spread
    scales (never near-uniform), and labels with two ignored positions."""
    gen = torch.Generator().manual_seed(seed)
    zs = (torch.randn(*shape, vs, generator=gen) * 3).to(dtype).requires_grad_()
    zt = (torch.randn(*shape, vt, generator=gen) * 2).to(dtype)
    labels = torch.randint(0, min(vs, vt), shape, generator=gen)
    labels.view(-1)[[1, 4]] = -100
    return zs, zt, labels


def _compiled_and_eager(fn, zs, *args):
    """(compiled out, compiled grad, eager out, eager grad) of fn(zs, *args).sum()-style
    losses: fn returns a scalar."""
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(zs, *args)
    got.backward()
    got_grad, zs.grad = zs.grad, None
    want = fn(zs, *args)
    want.backward()
    want_grad, zs.grad = zs.grad, None
    return got, got_grad, want, want_grad


# Same eager kernels inside the op: identical up to the graph's summation order.
TIGHT = {"rtol": 1e-6, "atol": 1e-7}
CASES = [(impl, red, div) for impl in IMPLS for red, div in
         [("mean", "jsd"), ("sum", "forward_kl"), ("none", "jsd"), ("mean", "forward_kl"),
          ("none", "alpha")]]


@pytest.mark.parametrize(("impl", "reduction", "divergence"), CASES)
def test_kd_loss_fullgraph_matches_eager(impl, reduction, divergence):
    zs, zt, labels = _logits((3, 5), 37, 41, seed=1)  # [B, T, V], Vs != Vt
    row_w = torch.linspace(0.5, 2.0, 15).reshape(3, 5)

    def loss_fn(zs, zt, labels):
        out = kdkernels.kd_loss(zs, zt, labels, divergence=divergence, temperature=2.0,
                                ce_weight=0.3, reduction=reduction, impl=impl, chunk_size=4)
        # grad_output != 1 through the graph: per row for 'none', a scalar otherwise.
        return (out * row_w).sum() if reduction == "none" else out * 1.5

    got, got_grad, want, want_grad = _compiled_and_eager(loss_fn, zs, zt, labels)
    torch.testing.assert_close(got, want, **TIGHT)
    torch.testing.assert_close(got_grad, want_grad, **TIGHT)
    assert want_grad.abs().sum() > 0
    assert not got_grad.view(-1, 37)[[1, 4]].any()  # ignored rows


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_loss_fullgraph_bf16_and_strided(impl):
    zs, zt, labels = _logits((2, 4), 53, 53, torch.bfloat16, seed=2)
    # A teacher whose last dim is not contiguous (copied, as in eager) and a student row
    # slice with unit last stride (no copy; its gradient is a fresh contiguous tensor).
    zt = zt.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert zt.stride(-1) != 1
    wide = torch.randn(2, 4, 60).to(torch.bfloat16).requires_grad_()

    def loss_fn(wide, zt, labels):
        return kdkernels.kd_loss(wide[..., :53], zt, labels, divergence="skew_reverse_kl",
                                 student_softcap=20.0, student_logit_scale=3.0,
                                 teacher_logit_scale=0.0625, impl=impl) * 0.7

    got, got_grad, want, want_grad = _compiled_and_eager(loss_fn, wide, zt, labels)
    assert got.dtype == want.dtype == torch.float32
    assert got_grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, **TIGHT)
    # One bf16 ulp: inductor does not round grad_output to bf16 before the product as eager
    # does (torch._inductor.config.emulate_precision_casts is off).
    torch.testing.assert_close(got_grad, want_grad, rtol=2**-7, atol=0)
    assert not got_grad[..., 53:].any()


def test_kd_loss_fullgraph_components():
    zs, zt, labels = _logits((3, 4), 29, 29, seed=3)

    def run(zs, zt, labels):
        return kdkernels.kd_loss(zs, zt, labels, ce_weight=0.5, kd_weight=0.0,
                                 reduction="none", return_components=True)

    torch._dynamo.reset()
    got = torch.compile(run, fullgraph=True)(zs, zt, labels)
    want = run(zs, zt, labels)
    assert isinstance(got, kdkernels.KDComponents)
    assert int(got.n_tokens) == int(want.n_tokens) == 10
    for name in ("loss", "kd", "ce", "student_entropy", "label_logprob"):
        assert getattr(got, name).shape == (3, 4)
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **TIGHT)
    assert not got.kd.requires_grad and not got.ce.requires_grad
    assert not got.student_entropy.requires_grad and not got.label_logprob.requires_grad
    got.loss.sum().backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0


def test_kd_loss_fullgraph_frozen_student():
    zs, zt, labels = _logits((6,), 31, 31, seed=4)
    zs = zs.detach()  # e.g. logits read from a cache
    torch._dynamo.reset()
    f = torch.compile(lambda zs, zt, y: kdkernels.kd_loss(zs, zt, y, divergence="jsd"),
                      fullgraph=True)
    got = f(zs, zt, labels)
    assert not got.requires_grad
    torch.testing.assert_close(got, kdkernels.kd_loss(zs, zt, labels, divergence="jsd"),
                               **TIGHT)


def test_kd_loss_compiled_label_check_still_raises():
    torch._dynamo.reset()
    zs, zt = torch.randn(4, 10), torch.randn(4, 12)
    f = torch.compile(lambda zs, zt, y: kdkernels.kd_loss(zs, zt, y), fullgraph=True)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        f(zs, zt, torch.tensor([0, 1, 2, 10]))


def test_kd_loss_compiled_vocab_parallel_not_supported():
    torch._dynamo.reset()
    vp = kdkernels.VocabParallel()
    f = torch.compile(lambda zs, zt: kdkernels.kd_loss(zs, zt, vocab_parallel=vp),
                      fullgraph=True)
    # Dynamo reports the exception raised while tracing with its message.
    with pytest.raises((NotImplementedError, torch._dynamo.exc.Unsupported),
                       match="vocab_parallel is not supported under torch.compile"):
        f(torch.randn(4, 8), torch.randn(4, 8))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kd_loss_opcheck(reduction):
    zs, zt, labels = _logits((7,), 23, 19, seed=5)
    from kdkernels.dense.compiled import LOGITS
    from kdkernels.options import KDOptions

    opts = KDOptions(divergence="jsd", beta=0.4, temperature=1.5, ce_weight=0.2,
                     teacher_softcap=10.0, student_logit_scale=0.5, teacher_logit_scale=3.0,
                     reduction=reduction, chunk_size=3, impl="torch")
    # the op's options are KDOptions' fields in order (the floats as 0-d tensors): no
    # hand-written list
    args = (zs.detach().requires_grad_(), zt, labels, True, *LOGITS.option_args(opts))
    torch.library.opcheck(torch.ops.kdkernels.kd_loss.default, args)


def test_fullgraph_fused_components_are_detached():
    torch._dynamo.reset()
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    labels = torch.randint(0, 40, (10,))

    @torch.compile(fullgraph=True)
    def f(h, w, labels):
        return kdkernels.fused_linear_kd_loss(h, w, h.detach() * 2, w.detach(), labels,
                                              ce_weight=0.5, return_components=True)

    out = f(h, w, labels)
    assert out.loss.requires_grad
    assert not out.kd.requires_grad and not out.ce.requires_grad  # as eager
    out.loss.backward()
    eager = kdkernels.fused_linear_kd_loss(h, w, h.detach() * 2, w.detach(), labels,
                                           ce_weight=0.5, return_components=True)
    torch.testing.assert_close(out.kd, eager.kd)
    assert out.n_tokens.device == eager.n_tokens.device and int(out.n_tokens) == 10
    for name in ("student_entropy", "label_logprob"):  # through the op's outputs, detached
        got, want = getattr(out, name), getattr(eager, name)
        assert not got.requires_grad and bool(torch.isfinite(want))
        torch.testing.assert_close(got, want)
