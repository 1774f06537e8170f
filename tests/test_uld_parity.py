"""uld_loss against TRL 1.16's own ULDLoss (trl.experimental.gold), on inputs that two different
byte-level BPE tokenizers (300 and 420 entries, trained here) made from accented, CJK and emoji
text: plain and hybrid, both merges, EOS skips, fixed and adaptive hybrid weights, temperatures
!= 1; the loss and the student-logit gradients.

Tolerances (relative, max |ours - TRL| / max |TRL|):
* float64: 1e-12. Both sides are the same math in float64; only the order of a few sums and
  products differs (we multiply a group's scalars as exp(sum log p), TRL one by one); we see
  <= 4e-16.
* float32: 1e-5. The loss is a sum of a few thousand float32 terms; a different summation
  order and the exp/log of the merge product move loss and gradient by a few ulp (we see
  <= 2.1e-7 against TRL, and <= 2e-6 for either of us against the float64 oracle on the same
  values, where the softmax gradients cancel), so 1e-5 has room and still catches a term
  computed wrongly.
* bfloat16 logits: we compute in float32 from the bf16 values, so against TRL on the same
  values upcast to float32 the loss keeps 1e-5, and the gradient, rounded to bf16 on its way
  back to the bf16 logits, is within bf16's half-ulp, 2**-8 of each element (we see 3e-3).
  Against TRL run in bf16 itself (softmax, merge, sort and sums in bf16, about 3 significant
  digits) the loss agrees to 3e-2 (we see 7e-3); TRL's bf16 gradient is too coarse to compare.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdkernels import uld_loss

from ._uld_helpers import (
    VS,
    VT,
    logits,
    loss_inputs,
    one_thread,  # noqa: F401 (the fixture)
    ours_kwargs,
    rel_err,
    synthetic_batch,
    synthetic_logits,
    text_batch,
    tokenizers,
    trl_uld,
)

pytest.importorskip("trl.experimental.gold.gold_trainer", reason="trl>=1.16 is in the dev extra")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
pytestmark = pytest.mark.usefixtures("one_thread")


def _compare(case: dict, dtype: torch.dtype, *, seed: int = 0, batch=None) -> tuple:
    batch = text_batch() if batch is None else batch
    offsets = case.get("offsets", True)
    args = loss_inputs(batch, offsets)
    zs, zt = logits(batch, dtype, seed)
    ref = trl_uld(**case)(zs, zt, *args)
    (g_ref,) = torch.autograd.grad(ref.sum(), zs)
    ours = uld_loss(zs, zt, *args, **ours_kwargs(case, batch["vocab_map"]))
    (g,) = torch.autograd.grad(ours, zs)
    assert ours.shape == () and torch.isfinite(ours)
    return rel_err(ours, ref.reshape(())), rel_err(g, g_ref), ref.item()


def test_the_text_batch_exercises_merges_on_both_sides():
    """The multibyte texts give multi-token groups on both sides (or the merge is untested)."""
    from kdkernels.uld import align_batch

    b = text_batch()
    for merge in ("observed", "bayesian"):
        g = align_batch(*loss_inputs(b), merge=merge)
        assert g.student.scalar_rows.numel() > 0 and g.teacher.scalar_rows.numel() > 0
        assert (g.groups_per_sample > 0).all()
    vmap = b["vocab_map"]
    assert vmap.numel() == VT and (vmap[-4:] == -1).all()  # padded teacher rows unmatched
    assert 0 < (vmap >= 0).sum() < VT


MODES = {
    "plain": {},
    "hybrid_adaptive": {"hybrid": True},
    "hybrid_fixed": {"hybrid": True, "matched_weight": 0.6, "unmatched_weight": 0.25},
}


@pytest.mark.parametrize("offsets", [True, False], ids=["bytes", "positional"])
@pytest.mark.parametrize("merge", ["observed", "bayesian"])
@pytest.mark.parametrize("mode", list(MODES))
def test_parity_with_trl(mode, merge, offsets):
    case = {**MODES[mode], "merge": merge, "offsets": offsets,
            "student_temperature": 1.3, "teacher_temperature": 0.7}
    for dtype in (torch.float64, torch.float32):
        loss_err, grad_err, value = _compare(case, dtype)
        assert value > 0
        assert loss_err <= TOL[dtype], (dtype, loss_err, value)
        assert grad_err <= TOL[dtype], (dtype, grad_err)


@pytest.mark.parametrize("skips", list(itertools.product([True, False], repeat=2)),
                         ids=lambda s: f"s{int(s[0])}t{int(s[1])}")
@pytest.mark.parametrize("merge", ["observed", "bayesian"])
@pytest.mark.parametrize("mode", ["plain", "hybrid_adaptive"])
def test_parity_eos_skips(mode, merge, skips):
    case = {**MODES[mode], "merge": merge, "skip_student_eos": skips[0],
            "skip_teacher_eos": skips[1]}
    for dtype in (torch.float64, torch.float32):
        loss_err, grad_err, _ = _compare(case, dtype, seed=3)
        assert loss_err <= TOL[dtype] and grad_err <= TOL[dtype], (dtype, loss_err, grad_err)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5, 0.3])
@pytest.mark.parametrize("temps", [(1.0, 1.0), (2.0, 0.5)])
def test_parity_hybrid_beta_and_temperatures(beta, temps):
    """The JSD's special cases (beta 0 and 1 are KL and reverse KL in GOLD) and temperatures."""
    case = {"hybrid": True, "beta": beta, "student_temperature": temps[0],
            "teacher_temperature": temps[1], "merge": "bayesian"}
    for dtype in (torch.float64, torch.float32):
        loss_err, grad_err, _ = _compare(case, dtype, seed=5)
        assert loss_err <= TOL[dtype] and grad_err <= TOL[dtype], (dtype, loss_err, grad_err)


def test_parity_weights_and_ce():
    """distillation_weight and ce_weight (TRL's CE: mean over the labelled next tokens)."""
    for mode in ("plain", "hybrid_fixed"):
        case = {**MODES[mode], "distillation_weight": 0.7, "ce_weight": 0.3,
                "student_temperature": 1.5}
        loss_err, grad_err, _ = _compare(case, torch.float64, seed=7)
        assert loss_err <= 1e-12 and grad_err <= 1e-12


def test_parity_bfloat16_logits():
    case = {"hybrid": True, "merge": "observed", "student_temperature": 1.2}
    batch = text_batch()
    args = loss_inputs(batch)
    zs, zt = logits(batch, torch.bfloat16, seed=11)
    ours = uld_loss(zs, zt, *args, **ours_kwargs(case, batch["vocab_map"]))
    assert ours.dtype == torch.float32
    (g,) = torch.autograd.grad(ours, zs)
    assert g.dtype == torch.bfloat16
    # TRL on the same values in float32: our float32 arithmetic, then bf16 rounding of the grad
    zs32 = zs.detach().float().requires_grad_(True)
    ref32 = trl_uld(**case)(zs32, zt.float(), *args)
    (g32,) = torch.autograd.grad(ref32, zs32)
    assert rel_err(ours, ref32) <= 1e-5
    assert rel_err(g, g32) <= 2.0**-8 + 1e-5
    # TRL computing in bf16 throughout: about 3 significant digits
    ref16 = trl_uld(**case)(zs, zt, *args)
    assert rel_err(ours, ref16) <= 3e-2, (ours.item(), ref16.item())


def test_parity_bayesian_span_at_position_zero():
    """No prompt on one side: GOLD drops the first aligned pair (bytes) or position."""
    batch = dict(text_batch())  # the student's prompt is cut away entirely
    lab = batch["student_labels"].clone()
    ids = batch["student_input_ids"].clone()
    offs = batch["student_offsets"].clone()
    for b in range(lab.shape[0]):
        p = int((lab[b] == -100).long().argmin())  # first labelled position
        n = lab.shape[1] - p
        lab[b, :n], ids[b, :n], offs[b, :n] = lab[b, p:].clone(), ids[b, p:].clone(), \
            offs[b, p:].clone()
        lab[b, n:] = -100
    batch.update(student_labels=lab, student_input_ids=ids, student_offsets=offs)
    for offsets in (True, False):
        case = {"merge": "bayesian", "offsets": offsets, "hybrid": True}
        loss_err, grad_err, value = _compare(case, torch.float64, batch=batch)
        assert value > 0 and loss_err <= 1e-12 and grad_err <= 1e-12


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), B=st.integers(1, 5),
       merge=st.sampled_from(["observed", "bayesian"]), offsets=st.booleans(),
       hybrid=st.booleans(), temps=st.sampled_from([(1.0, 1.0), (0.7, 1.9), (3.0, 0.4)]),
       skips=st.tuples(st.booleans(), st.booleans()))
def test_parity_property(seed, B, merge, offsets, hybrid, temps, skips):
    """Random byte segmentations (zero-width tokens, prompt-less and prompt-only samples,
    odd and prime lengths) against TRL, float64."""
    batch = synthetic_batch(seed, B, VS, VT)
    tokenizers()
    keys = ["student_labels", "teacher_labels", "student_input_ids", "teacher_input_ids"]
    args = tuple(batch[k] for k in keys)
    if offsets:
        args += (batch["student_offsets"], batch["teacher_offsets"])
    zs, zt = synthetic_logits(batch, VS, VT, seed)
    case = {"merge": merge, "offsets": offsets, "hybrid": hybrid,
            "student_temperature": temps[0], "teacher_temperature": temps[1],
            "skip_student_eos": skips[0], "skip_teacher_eos": skips[1]}
    ref = trl_uld(**case)(zs, zt, *args).reshape(())
    (g_ref,) = torch.autograd.grad(ref, zs)
    ours = uld_loss(zs, zt, *args, **ours_kwargs(case, text_batch()["vocab_map"]))
    (g,) = torch.autograd.grad(ours, zs)
    assert rel_err(ours, ref) <= 1e-12
    assert rel_err(g, g_ref) <= 1e-12
