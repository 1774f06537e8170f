"""Hypothesis property suite: every CPU backend against the float64 oracle.

Tolerances. fp32: 1e-5 norm-wise relative error on the loss and on every gradient (the
issue's bound); fp32 rounding of O(10) logits and of sums over <= 3000 terms stays near
1e-6, so 1e-5 leaves a margin without hiding a wrong formula (those err by >= 1e-3).
The error is relative to the scale of the problem, max(||ref||, ||twin||), where twin is
the same quantity for a well-conditioned twin loss (forward KL, no softcap, same T,
inputs and weights). Saturated softmaxes make some losses and gradients tiny (1e-5),
while their fp32 formulas still cancel O(|logit|) terms at eps 6e-8 (e.g. reverse KL's
p * (log p - log q - KL)), so relative accuracy on a tiny result is not attainable in
fp32 by any formula; the twin keeps the bound at 1e-5 of the problem's natural scale.
The loss's scale also counts one unit of weight per kept token (_unit_loss).
Where even that exceeds fp32's conditioning (|logit / T| ~ 100: KL terms of 100 cancel
to O(1) at eps 6e-8 per term), the bound is 4x the error of a naive fp32 loss
(log_softmax-based formulas in fp32 on the same inputs), i.e. "as good as fp32 allows".
bf16: our error against float64, on the same scale, must not exceed 2x that of a
same-dtype naive PyTorch loss plus BF16_SLACK = 2**-7 (one bf16 ulp at 1.0: the final
rounding of a bf16 result). TVD's gradient is discontinuous (sign(p - q)), so logits
rounded to bf16 flip signs and both implementations err by O(10%) there.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdkernels
from kdkernels.reference import reduce_rows, reference_fused_linear_kd_loss, reference_kd_loss

from ._helpers import make_fused, naive_fused, run_fused
from .conftest import cpu_impls

FP32_TOL = 1e-5
BF16_SLACK = 2.0**-7
VOCABS = st.one_of(st.sampled_from([2, 3, 5, 31, 97, 257, 1021, 2039, 2999, 3000]),
                   st.integers(2, 3000))
# The Triton interpreter runs each program in Python: keep its examples few and small.
BUDGET = {"triton": dict(max_examples=12, max_n=12, max_v=1500)}
DEFAULT_BUDGET = dict(max_examples=40, max_n=64, max_v=3000)
# KD_EXAMPLES=500 pytest ... runs a longer search than CI affords.
_EXTRA = int(os.environ.get("KD_EXAMPLES", "0"))


@st.composite
def loss_options(draw, n):
    div = draw(st.sampled_from(kdkernels.DIVERGENCES))
    reduction = draw(st.sampled_from(kdkernels.REDUCTIONS))
    unit = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
    opts = dict(
        divergence=div,
        beta=draw(unit),
        skew=draw(unit),
        alpha=draw(st.one_of(st.sampled_from([0.5, 0.05, 0.95]), st.floats(0.02, 0.98))),
        temperature=draw(st.one_of(st.sampled_from([0.25, 1.0, 8.0]), st.floats(0.25, 8.0))),
        scale_by_t2=draw(st.booleans()),
        kd_weight=draw(st.sampled_from([1.0, 0.5])),
        ce_weight=draw(st.sampled_from([0.0, 0.0, 0.7])),
        student_softcap=draw(st.sampled_from([None, None, 4.0, 30.0])),
        teacher_softcap=draw(st.sampled_from([None, None, 5.0])),
        # multipliers on the raw logits (Cohere logit_scale, Granite 1 / logits_scaling)
        student_logit_scale=draw(st.sampled_from([1.0, 1.0, 0.0625, 0.5, 3.0])),
        teacher_logit_scale=draw(st.sampled_from([1.0, 1.0, 0.0625, 0.5, 3.0])),
        reduction=reduction,
        num_items=draw(st.sampled_from([None, None, 7.0])) if reduction == "mean" else None,
        chunk_size=draw(st.one_of(st.none(), st.integers(1, max(1, n + 3)))),
    )
    return opts


@st.composite
def fused_cases(draw, impl):
    b = BUDGET.get(impl, DEFAULT_BUDGET)
    n = draw(st.integers(0, b["max_n"]))
    vs = min(draw(VOCABS), b["max_v"])
    vt = draw(st.sampled_from([vs, vs, vs + draw(st.integers(1, 9))]))
    if draw(st.booleans()):
        vs, vt = vt, vs
    ds, dt = draw(st.sampled_from([(8, 16), (17, 5), (32, 12)]))
    case = dict(
        n=n, vs=vs, vt=vt, ds=ds, dt=dt,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        bias=draw(st.booleans()),
        ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        logit_scale=draw(st.sampled_from([0.5, 3.0, 10.0])),
        seed=draw(st.integers(0, 2**16)),
        go=draw(st.sampled_from([1.0, 0.37, -2.0])),
        components=draw(st.booleans()),
    )
    return case, draw(loss_options(n))


def _go(loss, scale):
    if loss.dim() == 0:
        return torch.tensor(scale)
    return torch.linspace(-1.0, 2.0, loss.numel()).reshape(loss.shape) * scale


def _twin(opts):
    return {**opts, "divergence": "forward_kl", "student_softcap": None,
            "teacher_softcap": None}


def _mixture_terms(opts) -> float:
    """The size of the terms fp32 subtracts: O(10), or |log w| of a mixture weight w (jsd's
    beta, the skew KLs' skew, and 1 - w) where that is larger. Hypothesis draws weights down
    to 1e-300, where log w ~ -690 and the loss, ~w, is left with ~1e-8 |log w| of rounding
    (seen: beta 3e-219, 1.1e-5 absolute)."""
    param = {"jsd": "beta", "skew_forward_kl": "skew", "skew_reverse_kl": "skew"}.get(
        opts["divergence"])
    if param is None:
        return 10.0
    w = float(opts[param])
    logs = [-math.log(x) for x in (w, 1.0 - w) if 0.0 < x < 1.0]
    return max([10.0, *logs])


def _unit_loss(opts, labels, n):
    """The loss if every kept token contributed its full weight (soft_scale + ce_weight):
    the scale of an O(1)-per-token loss. fp32 forms KL as a difference of O(10) terms, so a
    small divergence is only accurate to ~1e-6 absolute per token; 1e-5 of this unit is
    far below any training signal."""
    kept = n if labels is None else int((labels != -100).sum())
    t2 = opts["temperature"] ** 2 if opts["scale_by_t2"] else 1.0
    unit = (opts["kd_weight"] * t2 + opts["ce_weight"]) * _mixture_terms(opts) / 10
    if opts["reduction"] == "none":
        return unit * kept**0.5
    if opts["reduction"] == "sum":
        return unit * kept
    return unit * kept / (opts["num_items"] or max(kept, 1))


def _scaled_err(x, ref, twin, unit=0.0):
    scale = max(ref.double().norm().item(), twin.double().norm().item(), unit)
    err = (x.double() - ref.double()).norm().item()
    return err / scale if scale > 0 else err


def _signals(out: dict, opts: dict, labelled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(student_entropy, label_logprob) of a reference result, reduced like the loss; without
    labels label_logprob is NaN whatever the reduction (even over no tokens)."""
    ent, lp = (reduce_rows(out[k], out["kept"], opts["reduction"], opts["num_items"])
               for k in ("student_entropy", "label_logprob"))
    return ent, lp if labelled else torch.full_like(lp, math.nan)


def _check_signals(ours, ref: dict, naive: dict, opts: dict, vocab: int, fp32: bool,
                   labelled: bool = True) -> None:
    """student_entropy and label_logprob against the oracle, with the loss's per-dtype bounds
    (_check_fp32 / _check_bf16, the naive yardstick evaluated in the input dtype). Their
    natural scale per token is log V, the largest entropy (a unit below which errors are
    invisible next to it, as _unit_loss is for the loss)."""
    kept = ref["kept"]
    per = {"none": kept**0.5, "sum": kept}.get(opts["reduction"],
                                                kept / (opts["num_items"] or max(kept, 1)))
    unit = math.log(max(vocab, 2)) * per
    check = _check_fp32 if fp32 else _check_bf16
    names = ("student_entropy", "label_logprob")
    for name, o, r, nv in zip(names, (ours.student_entropy, ours.label_logprob),
                              _signals(ref, opts, labelled), _signals(naive, opts, labelled),
                              strict=True):
        assert not o.requires_grad, f"{name} must be detached"
        assert o.shape == r.shape, (name, o.shape, r.shape)
        nan = torch.isnan(r)  # label_logprob without labels: NaN, and nothing else is
        assert torch.equal(torch.isnan(o), nan), f"{name}: NaN pattern differs"
        if not nan.all():
            check(o, r, r, nv, name, unit)


def _check_fp32(ours, ref, twin, naive, what, unit=0.0):
    bound = max(FP32_TOL, 4 * _scaled_err(naive, ref, twin, unit))
    err = _scaled_err(ours, ref, twin, unit)
    assert err <= bound, f"{what}: scaled error {err:.3g} > {bound:.3g}"


def _check_bf16(ours, ref, twin, naive, what, unit=0.0):
    bound = 2 * _scaled_err(naive, ref, twin, unit) + BF16_SLACK
    err = _scaled_err(ours, ref, twin, unit)
    assert err <= bound, f"{what}: bf16 scaled error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("impl", cpu_impls())
def test_fused_linear_matches_oracle(impl):
    b = BUDGET.get(impl, DEFAULT_BUDGET)

    @settings(max_examples=_EXTRA or b["max_examples"], deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(fused_cases(impl))
    def check(drawn):
        case, opts = drawn
        inp = make_fused(case["n"], case["vs"], case["vt"], case["ds"], case["dt"],
                         case["dtype"], bias=case["bias"], logit_scale=case["logit_scale"],
                         ignore_frac=case["ignore_frac"], seed=case["seed"])
        ref = run_fused(reference_fused_linear_kd_loss, inp,
                        grad_output=_go(torch.zeros(()) if opts["reduction"] != "none"
                                        else torch.zeros(case["n"]), case["go"]), **opts)
        go = _go(ref[0], case["go"])
        ours = run_fused(kdkernels.fused_linear_kd_loss, inp, grad_output=go, impl=impl,
                         **opts)
        names = ("loss", "grad_hidden", "grad_weight", "grad_bias")
        assert ours[0].shape == ref[0].shape
        assert ours[1].dtype == inp["h"].dtype and ours[2].dtype == inp["w"].dtype
        twin = run_fused(reference_fused_linear_kd_loss, inp, grad_output=go, **_twin(opts))
        naive = naive_fused(inp, **opts)
        naive[0].backward(go.to(naive[0].dtype))
        naive_vals = (naive[0].detach(), naive[1].grad, naive[2].grad,
                      None if naive[3] is None else naive[3].grad)
        check = _check_fp32 if case["dtype"] == torch.float32 else _check_bf16
        units = (_unit_loss(opts, inp["labels"], case["n"]), 0.0, 0.0, 0.0)
        rows = zip(ours, ref, twin, naive_vals, names, units, strict=True)
        for o, r, t, nv, name, unit in rows:
            if r is not None:
                check(o, r, t, nv, name, unit)
        if case["components"]:  # the per-token signals of the same call
            with torch.no_grad():
                comp = kdkernels.fused_linear_kd_loss(
                    inp["h"], inp["w"], inp["g"], inp["u"], inp["labels"],
                    student_bias=inp["bs"], teacher_bias=inp["bt"], impl=impl,
                    return_components=True, **opts)
                ref_out = reference_fused_linear_kd_loss(
                    inp["h"], inp["w"], inp["g"], inp["u"], inp["labels"],
                    student_bias=inp["bs"], teacher_bias=inp["bt"], **opts)
                zs, zt = (x.reshape(-1, x.shape[-1]) @ y.t() for x, y in
                          ((inp["h"], inp["w"]), (inp["g"], inp["u"])))
                if inp["bs"] is not None:
                    zs, zt = zs + inp["bs"], zt + inp["bt"]
                naive_out = reference_kd_loss(zs, zt, inp["labels"], compute_dtype=zs.dtype,
                                              **opts)
            _check_signals(comp, ref_out, naive_out, opts, min(case["vs"], case["vt"]),
                           case["dtype"] == torch.float32)

    check()


@st.composite
def logits_cases(draw, impl):
    b = BUDGET.get(impl, DEFAULT_BUDGET)
    n = draw(st.integers(0, b["max_n"]))
    vs = min(draw(VOCABS), b["max_v"])
    vt = draw(st.sampled_from([vs, vs + 3]))
    return dict(n=n, vs=vs, vt=vt, seed=draw(st.integers(0, 2**16)),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                scale=draw(st.sampled_from([1.0, 5.0])), ignore=draw(st.booleans()),
                labels=draw(st.sampled_from([True, True, False])),
                go=draw(st.sampled_from([1.0, -0.5]))), draw(loss_options(n))


@pytest.mark.parametrize("impl", cpu_impls())
def test_kd_loss_matches_oracle(impl):
    b = BUDGET.get(impl, DEFAULT_BUDGET)

    @settings(max_examples=_EXTRA or b["max_examples"], deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(logits_cases(impl))
    def check(drawn):
        case, opts = drawn
        gen = torch.Generator().manual_seed(case["seed"])
        zs = (torch.randn(case["n"], case["vs"], generator=gen) * case["scale"]).to(case["dtype"])
        zt = (torch.randn(case["n"], case["vt"], generator=gen) * case["scale"]).to(case["dtype"])
        labels = torch.randint(0, min(case["vs"], case["vt"]), (case["n"],), generator=gen)
        if case["ignore"]:
            labels[::3] = -100
        if not case["labels"]:  # label_logprob is NaN; CE needs labels
            labels = None
            opts = {**opts, "ce_weight": 0.0}
        z64 = zs.double().requires_grad_()
        # + 0 * sum: a loss free of the student (skew_forward_kl at skew 1, no CE) has a
        # zero gradient, but no graph to take it from
        ref = reference_kd_loss(z64, zt.double(), labels, **opts)["loss"] + 0 * z64.sum()
        go = _go(ref.detach(), case["go"]).double()
        ref.backward(go)
        zq = zs.clone().requires_grad_()
        ours = kdkernels.kd_loss(zq, zt, labels, impl=impl, **opts)
        ours.backward(go.to(ours.dtype))
        assert zq.grad.dtype == zs.dtype and zq.grad.shape == zs.shape
        zw = zs.double().requires_grad_()
        twin = reference_kd_loss(zw, zt.double(), labels, **_twin(opts))["loss"] + 0 * zw.sum()
        twin.backward(go)
        zn = zs.clone().requires_grad_()
        naive = (reference_kd_loss(zn, zt, labels, compute_dtype=zs.dtype, **opts)["loss"]
                 + 0 * zn.sum())
        naive.backward(go.to(naive.dtype))
        check = _check_fp32 if case["dtype"] == torch.float32 else _check_bf16
        check(ours.detach(), ref.detach(), twin.detach(), naive.detach(), "loss",
              _unit_loss(opts, labels, case["n"]))
        check(zq.grad, z64.grad, zw.grad, zn.grad, "grad_logits")
        # the per-token signals, from the stats pass of a second (forward-only) call
        with torch.no_grad():
            comp = kdkernels.kd_loss(zs, zt, labels, impl=impl, return_components=True, **opts)
            ref_out = reference_kd_loss(zs.double(), zt.double(), labels, **opts)
            naive_out = reference_kd_loss(zs, zt, labels, compute_dtype=zs.dtype, **opts)
        _check_signals(comp, ref_out, naive_out, opts, min(case["vs"], case["vt"]),
                       case["dtype"] == torch.float32, labels is not None)

    check()
