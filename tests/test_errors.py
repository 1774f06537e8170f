"""Every bad input raises a clear error naming the argument, what was expected and got."""

from __future__ import annotations

import pytest
import torch

import kdkernels


def _inputs(n=4, v=10, ds=6, dt=5):
    return (torch.randn(n, ds, requires_grad=True), torch.randn(v, ds, requires_grad=True),
            torch.randn(n, dt), torch.randn(v, dt), torch.randint(0, v, (n,)))


def _call(**over):
    h, w, g, u, labels = _inputs()
    args = dict(student_hidden=h, student_weight=w, teacher_hidden=g, teacher_weight=u,
                labels=labels)
    args.update(over)
    return kdkernels.fused_linear_kd_loss(
        args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_hidden"),
        args.pop("teacher_weight"), args.pop("labels"), **args)


CASES = [
    (dict(teacher_hidden=torch.randn(3, 5)), ValueError,
     r"teacher_hidden must have the leading shape of student_hidden, \[4\]; got \[3\]"),
    (dict(student_weight=torch.randn(10, 7)), ValueError,
     r"student_weight must be \[V, D\] .* D = student_hidden.shape\[-1\] = 6; got \[10, 7\]"),
    (dict(teacher_weight=torch.randn(10)), ValueError, r"teacher_weight must be \[V, D\]"),
    (dict(student_hidden=torch.randint(0, 3, (4, 6))), TypeError,
     r"student_hidden must have a floating dtype .* got torch.int64"),
    (dict(teacher_weight=torch.ones(10, 5, dtype=torch.int32)), TypeError,
     r"teacher_weight must have a floating dtype"),
    (dict(student_hidden=[[1.0]]), TypeError, r"student_hidden must be a torch.Tensor, got list"),
    (dict(student_hidden=torch.randn(4, 6, device="meta")), ValueError,
     r"all tensors must be on one device: student_hidden is on meta but student_weight is on "
     r"cpu"),
    (dict(labels=torch.tensor([0, 1, 10, 2])), ValueError,
     r"labels must be in \[0, 10\) .* ignore_index=-100; got 10 at flat position 2"),
    (dict(labels=torch.tensor([0, -1, 3, 2])), ValueError, r"labels must be in \[0, 10\).*got -1"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError,
     r"labels must be an integer tensor .* got torch.float32"),
    (dict(labels=torch.tensor([0, 1])), ValueError,
     r"labels must have the leading shape of student_hidden, \[4\]; got \[2\]"),
    (dict(temperature=0.0), ValueError, r"temperature must be > 0.0, got 0.0"),
    (dict(temperature=-1), ValueError, r"temperature must be > 0.0, got -1.0"),
    (dict(temperature=float("nan")), ValueError, r"temperature must be finite, got nan"),
    (dict(temperature=float("inf")), ValueError, r"temperature must be finite, got inf"),
    (dict(beta=1.5), ValueError, r"beta must be <= 1.0, got 1.5"),
    (dict(beta=-0.1), ValueError, r"beta must be >= 0.0, got -0.1"),
    (dict(skew=2.0), ValueError, r"skew must be <= 1.0, got 2.0"),
    (dict(labels=None, ce_weight=0.5), ValueError,
     r"ce_weight=0.5 > 0 needs labels \(token ids\), but labels is None"),
    (dict(divergence="kl"), ValueError,
     r"divergence must be one of forward_kl, reverse_kl, jsd, skew_forward_kl, "
     r"skew_reverse_kl, tvd, alpha; got 'kl'"),
    (dict(alpha=0.0), ValueError, r"alpha must be in the open interval \(0, 1\), got 0.0"),
    (dict(alpha=1.0), ValueError, r"alpha must be in the open interval \(0, 1\), got 1.0"),
    (dict(alpha=1.5), ValueError, r"alpha must be in the open interval \(0, 1\), got 1.5"),
    (dict(alpha=-0.2), ValueError, r"alpha must be in the open interval \(0, 1\), got -0.2"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be finite, got nan"),
    (dict(alpha=float("inf")), ValueError, r"alpha must be finite, got inf"),
    (dict(divergence="alpha", alpha="half"), TypeError, r"alpha must be a real number"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of mean, sum, none; got 'avg'"),
    (dict(impl="fast"), ValueError, r"impl must be one of auto, torch, triton, cpp, cuda; got "
     r"'fast'"),
    (dict(impl="cuda"), ValueError, r"impl='cuda' cannot serve this input: .*"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be a positive int or None, got 0"),
    (dict(max_workspace_bytes=-5), ValueError, r"max_workspace_bytes must be a positive int"),
    (dict(num_items=0), ValueError, r"num_items must be > 0.0, got 0.0"),
    (dict(kd_weight=-1.0), ValueError, r"kd_weight must be >= 0.0, got -1.0"),
    (dict(student_softcap=0.0), ValueError, r"student_softcap must be > 0.0, got 0.0"),
    (dict(student_bias=torch.randn(9)), ValueError,
     r"student_bias must be \[10\] \(one entry per head row\); got \[9\]"),
    (dict(teacher_bias=torch.ones(10, dtype=torch.int64)), TypeError,
     r"teacher_bias must have a floating dtype"),
    (dict(student_weight=torch.randn(10, 6, dtype=torch.float64)), TypeError,
     r"student_hidden and student_weight must share a dtype outside torch.autocast; got "
     r"torch.float32 and torch.float64"),
    (dict(scale_by_t2=1), TypeError, r"scale_by_t2 must be a bool, got 1"),
    (dict(student_logit_scale=0), ValueError, r"student_logit_scale must be > 0.0, got 0.0"),
    (dict(student_logit_scale=-0.5), ValueError,
     r"student_logit_scale must be > 0.0, got -0.5"),
    (dict(teacher_logit_scale=float("inf")), ValueError,
     r"teacher_logit_scale must be finite, got inf"),
    (dict(teacher_logit_scale=float("nan")), ValueError,
     r"teacher_logit_scale must be finite, got nan"),
    (dict(student_logit_scale="2"), TypeError,
     r"student_logit_scale must be a real number, got str '2'"),
    (dict(teacher_logit_scale=None), TypeError,
     r"teacher_logit_scale must be a real number, got NoneType"),
    (dict(teacher_logit_scale=-3), ValueError, r"teacher_logit_scale must be > 0.0, got -3.0"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int, got 1.5"),
]


@pytest.mark.parametrize("over, exc, pattern", CASES,
                         ids=[",".join(c[0]) + f"-{i}" for i, c in enumerate(CASES)])
def test_fused_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(**over)


@pytest.mark.parametrize("over, exc, pattern", [
    (dict(teacher_logits=torch.randn(3, 10)), ValueError,
     r"teacher_logits must have the leading shape of student_logits, \[4\]; got \[3\]"),
    (dict(student_logits=torch.randint(0, 2, (4, 10))), TypeError,
     r"student_logits must have a floating dtype"),
    (dict(labels=torch.tensor([0, 1, 2, 11])), ValueError, r"labels must be in \[0, 10\)"),
    (dict(temperature=0), ValueError, r"temperature must be > 0.0"),
    (dict(teacher_logit_scale=0.0), ValueError, r"teacher_logit_scale must be > 0.0"),
    (dict(student_logit_scale=float("-inf")), ValueError,
     r"student_logit_scale must be finite, got -inf"),
    (dict(student_logits=torch.randn(4, 0)), ValueError, r"must be \[..., V\] with V >= 1"),
])
def test_logits_bad_input(over, exc, pattern):
    args = dict(student_logits=torch.randn(4, 10), teacher_logits=torch.randn(4, 12),
                labels=torch.randint(0, 10, (4,)))
    args.update(over)
    with pytest.raises(exc, match=pattern):
        kdkernels.kd_loss(args.pop("student_logits"), args.pop("teacher_logits"),
                          args.pop("labels"), **args)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="divergence must be one of"):
        kdkernels.FusedLinearKDLoss(divergence="nope")
    with pytest.raises(TypeError):
        kdkernels.FusedLinearKDLoss(not_an_option=1)
    with pytest.raises(ValueError, match="student_logit_scale must be > 0.0, got -1.0"):
        kdkernels.FusedLinearKDLoss(student_logit_scale=-1.0)


def test_unservable_impl_says_why():
    """An explicit impl that cannot serve an input (float64 here) raises its reasons."""
    from kdkernels.backends import registry
    from kdkernels.backends.base import RowSpec

    spec = RowSpec.build("forward_kl")
    checked = 0
    for impl in ("triton", "cpp", "cuda"):
        why = registry.reasons(impl, torch.device("cpu"), torch.float64, spec)
        if not why:
            continue
        checked += 1
        h, w, g, u, labels = (t.double() if t.is_floating_point() else t for t in _inputs())
        with pytest.raises(ValueError, match=rf"impl='{impl}' cannot serve this input: .+"):
            kdkernels.fused_linear_kd_loss(h, w, g, u, labels, impl=impl)
    assert checked  # cuda at least can never serve CPU tensors
