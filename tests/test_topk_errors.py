"""Every bad input of the top-k losses raises a message naming the argument, the expected
form and, where it matters, the row."""

from __future__ import annotations

import pytest
import torch

import kdkernels


def _inputs(n=4, vocab=20, dim=6, k=3):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, dim, generator=gen)
    w = torch.randn(vocab, dim, generator=gen)
    lp = torch.log_softmax(torch.randn(n, vocab, generator=gen), -1)
    top = lp.topk(k, -1)
    return h, w, top.indices.clone(), top.values.clone()


def _fused(h, w, ids, lps, labels=None, **opts):
    return kdkernels.fused_linear_topk_kd_loss(h, w, ids, lps, labels, **opts)


def test_id_out_of_range_names_row():
    h, w, ids, lps = _inputs()
    ids[2, 1] = 20
    with pytest.raises(ValueError, match=r"teacher_ids must be < V = 20.*row 2, slot 1"):
        _fused(h, w, ids, lps)


def test_duplicate_ids():
    h, w, ids, lps = _inputs()
    ids[1, 2] = ids[1, 0]
    with pytest.raises(ValueError, match=r"must not repeat.*row 1"):
        _fused(h, w, ids, lps)


def test_duplicate_empty_slots_are_fine():
    h, w, ids, lps = _inputs()
    ids[1, 1:] = -1
    ids[3, :] = -5
    assert torch.isfinite(_fused(h, w, ids, lps))


def test_positive_logprob():
    h, w, ids, lps = _inputs()
    lps[3, 0] = 0.5
    with pytest.raises(ValueError, match=r"teacher_logprobs must be <= 0.*row 3, slot 0"):
        _fused(h, w, ids, lps)


def test_exp_sum_above_one():
    h, w, ids, lps = _inputs()
    lps[0] = torch.log(torch.tensor([0.6, 0.5, 0.1]))
    with pytest.raises(ValueError, match=r"exp-sum to at most 1.*row 0 sums to 1.2"):
        _fused(h, w, ids, lps)


def test_rounding_within_tolerance_is_accepted():
    h, w, ids, lps = _inputs()
    lps[0] = torch.log(torch.tensor([0.6, 0.3, 0.1])) + 2e-5  # fp32 tolerance 1e-4
    ids[1, 1:] = -1
    lps[1, 0] = 3e-5  # a log-prob a hair above 0 (server rounding of a certain token)
    assert torch.isfinite(_fused(h, w, ids, lps))


def test_bf16_tolerance_is_wider():
    h, w, ids, lps = _inputs()
    lps[0] = torch.log(torch.tensor([0.6, 0.3, 0.1])) + 5e-3
    with pytest.raises(ValueError, match="exp-sum"):
        _fused(h, w, ids, lps)
    assert torch.isfinite(_fused(h, w, ids, lps.bfloat16()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logprob(bad):
    h, w, ids, lps = _inputs()
    lps[2, 2] = bad
    with pytest.raises(ValueError, match=r"must be finite in valid slots.*row 2, slot 2"):
        _fused(h, w, ids, lps)


def test_garbage_in_empty_slots_is_ignored():
    h, w, ids, lps = _inputs()
    ids[2, 2] = -1
    lps[2, 2] = float("nan")
    assert torch.isfinite(_fused(h, w, ids, lps))


def test_ignored_rows_are_not_checked():
    h, w, ids, lps = _inputs()
    ids[1, 0] = 99
    labels = torch.tensor([1, -100, 2, 3])
    assert torch.isfinite(_fused(h, w, ids, lps, labels))


def test_k_above_vocab():
    h, w, _, _ = _inputs(vocab=4)
    ids = torch.tensor([[0, 1, 2, 3, -1]] * 4)
    lps = torch.full((4, 5), -2.0)
    with pytest.raises(ValueError, match=r"K = 5 slots per row but the vocabulary has V = 4"):
        _fused(h, w, ids, lps)


@pytest.mark.parametrize("what", ["ids", "lps", "labels", "hidden"])
def test_shape_mismatches(what):
    h, w, ids, lps = _inputs()
    labels = torch.zeros(4, dtype=torch.long)
    if what == "ids":
        ids = ids[:3]
        match = r"teacher_ids must be \[..., K\] with the leading shape of student_hidden"
    elif what == "lps":
        lps = lps[:, :2]
        match = r"teacher_logprobs must have the shape of teacher_ids"
    elif what == "labels":
        labels = labels[:3]
        match = r"labels must have the leading shape of student_hidden"
    else:
        w = w[:, :5]
        match = r"student_weight must be \[V, D\]"
    with pytest.raises(ValueError, match=match):
        _fused(h, w, ids, lps, labels)


def test_wrong_dtypes():
    h, w, ids, lps = _inputs()
    with pytest.raises(TypeError, match="teacher_ids must be int32 or int64"):
        _fused(h, w, ids.float(), lps)
    with pytest.raises(TypeError, match="teacher_logprobs must be float32, bfloat16 or float16"):
        _fused(h, w, ids, lps.long())
    with pytest.raises(TypeError, match="teacher_ids must be a torch.Tensor"):
        _fused(h, w, ids.tolist(), lps)
    assert torch.isfinite(_fused(h, w, ids.int(), lps.half()))


def test_logits_api_checks():
    h, w, ids, lps = _inputs()
    zs = h @ w.T
    with pytest.raises(ValueError, match="leading shape of student_logits"):
        kdkernels.topk_kd_loss(zs, ids[:2], lps[:2])
    ids[0, 0] = 25
    with pytest.raises(ValueError, match="teacher_ids must be < V = 20"):
        kdkernels.topk_kd_loss(zs, ids, lps)


@pytest.mark.parametrize("tail,divergence", [("zero", "reverse_kl"), ("zero", "jsd"),
                                             ("zero", "tvd"), ("zero", "alpha")])
def test_divergence_not_defined_under_tail(tail, divergence):
    with pytest.raises(ValueError, match=rf"divergence='{divergence}' is not defined under "
                                         rf"tail='{tail}'"):
        kdkernels.FusedLinearTopKKDLoss(tail=tail, divergence=divergence)


def test_bad_options():
    h, w, ids, lps = _inputs()
    with pytest.raises(ValueError, match="tail must be one of zero, renormalize, bucket"):
        _fused(h, w, ids, lps, tail="drop")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        _fused(h, w, ids, lps, temperature=0.0)
    with pytest.raises(ValueError, match="ce_weight=0.5 > 0 needs labels"):
        _fused(h, w, ids, lps, ce_weight=0.5)
    with pytest.raises(ValueError, match="impl must be one of"):
        _fused(h, w, ids, lps, impl="nope")


def test_label_out_of_range():
    h, w, ids, lps = _inputs()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 20\)"):
        _fused(h, w, ids, lps, torch.tensor([0, 1, 20, 2]))


def test_devices_must_match():
    h, w, ids, lps = _inputs()
    with pytest.raises(ValueError, match="one device"):
        _fused(h, w, ids.to("meta"), lps)


@pytest.mark.parametrize("value, exc, pattern", [
    (0.0, ValueError, r"student_logit_scale must be > 0.0, got 0.0"),
    (-2.0, ValueError, r"student_logit_scale must be > 0.0, got -2.0"),
    (float("inf"), ValueError, r"student_logit_scale must be finite, got inf"),
    (float("nan"), ValueError, r"student_logit_scale must be finite, got nan"),
    ("x", TypeError, r"student_logit_scale must be a real number"),
])
def test_bad_student_logit_scale(value, exc, pattern):
    h, w, ids, lps = _inputs()
    with pytest.raises(exc, match=pattern):
        _fused(h, w, ids, lps, student_logit_scale=value)
    with pytest.raises(exc, match=pattern):
        kdkernels.topk_kd_loss(h @ w.T, ids, lps, student_logit_scale=value)
    with pytest.raises(exc, match=pattern):
        kdkernels.FusedLinearTopKKDLoss(student_logit_scale=value)


def test_topk_has_no_teacher_logit_scale():
    """The top-k teacher arrives as log-probs: a teacher scale has nothing to scale."""
    h, w, ids, lps = _inputs()
    with pytest.raises(TypeError, match="teacher_logit_scale"):
        _fused(h, w, ids, lps, teacher_logit_scale=2.0)
    with pytest.raises(TypeError, match="teacher_logit_scale"):
        kdkernels.FusedLinearTopKKDLoss(teacher_logit_scale=2.0)
