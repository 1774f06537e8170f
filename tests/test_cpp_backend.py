"""The cpp backend (csrc/rows_cpu.cpp) against the torch reference backend, op by op."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from kdkernels.backends import registry
from kdkernels.divergences import TABLE
from kdkernels.layouts import COEF, CONSTS, MIX, NORMS
from tests._rowop_cases import (
    DIVERGENCES,
    check_all,
    check_grad,
    check_stats,
    coefficients,
    make_labels,
    make_logits,
    norms_of,
    spec_of,
)

if shutil.which("c++") is None:  # a machine without a compiler: the backend says why
    pytest.skip("no C++ compiler on PATH", allow_module_level=True)

_loaded = registry.load("cpp")
if isinstance(_loaded, str):  # a compiler is here, so the extension must build
    raise AssertionError(_loaded)
CPP = _loaded
CPU = torch.device("cpu")
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
               (torch.float32, torch.float16)]


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}"[6:])
def test_every_divergence_and_dtype(div, dtypes):
    zs = make_logits(9, 1031, dtypes[0], CPU, seed=3)
    zt = make_logits(9, 1031, dtypes[1], CPU, seed=4)
    check_all(CPP, zs, zt, make_labels(9, 1031, CPU), spec_of(div, 1.0, ce=True))


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("temperature,scap,tcap", [(2.5, 30.0, 20.0), (0.5, None, 15.0),
                                                   (1.0, 10.0, None), (3.0, None, None)])
def test_temperatures_and_softcaps(div, temperature, scap, tcap):
    zs = make_logits(6, 777, torch.float32, CPU, scale=8.0, seed=5)
    zt = make_logits(6, 777, torch.float32, CPU, scale=8.0, seed=6)
    check_all(CPP, zs, zt, make_labels(6, 777, CPU),
              spec_of(div, temperature, scap=scap, tcap=tcap, ce=True))


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("scale_s,scale_t,temperature,scap", [
    (0.0625, 3.0, 1.0, None), (3.0, 0.5, 2.0, 20.0), (0.5, 1.0, 0.7, 5.0)])
def test_logit_scales(div, scale_s, scale_t, temperature, scap):
    """The scales multiply the raw logits where the kernels load them (label logit too)."""
    zs = make_logits(5, 1031, torch.bfloat16, CPU, scale=6.0, seed=7)
    zt = make_logits(5, 1031, torch.bfloat16, CPU, scale=6.0, seed=8)
    check_all(CPP, zs, zt, make_labels(5, 1031, CPU),
              spec_of(div, temperature, scap=scap, tcap=4.0, ce=True, scale_s=scale_s,
                      scale_t=scale_t))


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 9000), (2, 4099), (3, 1), (1, 17),
                                       (130, 97), (5, 8192)])
def test_shapes_including_vocab_split(rows, cols):
    # One or two rows with a wide vocab take the vocab-split path (partials merged).
    zs = make_logits(rows, cols, torch.bfloat16, CPU, seed=7)
    zt = make_logits(rows, cols, torch.bfloat16, CPU, seed=8)
    for div in ("forward_kl", "jsd"):
        check_all(CPP, zs, zt, make_labels(rows, cols, CPU), spec_of(div, 2.0, ce=True))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        zs = make_logits(3, 6000, torch.float32, CPU, seed=9)
        zt = make_logits(3, 6000, torch.float32, CPU, seed=10)
        check_all(CPP, zs, zt, make_labels(3, 6000, CPU), spec_of("reverse_kl", 1.5, ce=True))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("div", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("w", [0.0, 1.0])
def test_mixture_weights_zero_and_one_are_exact(div, w):
    # skew at 0 or 1 makes logm = logp or logq (mix_kind only_p / only_q): no log(0)
    # arithmetic, no NaN. jsd at beta 0 or 1 is folded into forward / reverse KL by RowSpec.
    zs = make_logits(5, 300, torch.float32, CPU, seed=11)
    zt = make_logits(5, 300, torch.float32, CPU, seed=12)
    spec = spec_of(div, 1.0, beta=w, skew=w)
    assert spec.needs_mix == (div != "jsd")
    stats = check_stats(CPP, zs, zt, make_labels(5, 300, CPU), spec)
    if spec.needs_mix:
        assert torch.isfinite(CPP.mix(zs, zt, norms_of(stats), spec)).all()
    check_all(CPP, zs, zt, make_labels(5, 300, CPU), spec)


def test_strided_rows_and_separate_out_of_another_dtype():
    zs = make_logits(7, 500, torch.bfloat16, CPU, row_stride=613, seed=13)
    zt = make_logits(7, 500, torch.float32, CPU, row_stride=509, seed=14)
    assert zs.stride(0) == 613 and not zs.is_contiguous()
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        check_all(CPP, zs, zt, make_labels(7, 500, CPU), spec_of("skew_reverse_kl", 2.0),
                  out_dtype=out_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_aliasing_zs(dtype):
    zs = make_logits(6, 2111, dtype, CPU, seed=15)
    zt = make_logits(6, 2111, dtype, CPU, seed=16)
    check_all(CPP, zs, zt, make_labels(6, 2111, CPU), spec_of("tvd", 1.0, ce=True), alias=True)


def test_garbage_rows_with_zero_coefficients_get_exact_zeros():
    zs = make_logits(4, 333, torch.float32, CPU, seed=17).clone()
    zt = make_logits(4, 333, torch.float32, CPU, seed=18).clone()
    zs[1, 5], zs[1, 9], zt[1, 7] = math.nan, math.inf, -math.inf
    zs[3] = math.nan
    labels = make_labels(4, 333, CPU)
    spec = spec_of("jsd", 1.0, ce=True)
    coef = coefficients(CPP.stats(zs, zt, labels, spec), dead_rows=(1, 3))
    for div in DIVERGENCES:
        spec = spec_of(div, 2.0, scap=20.0, ce=True)
        out = torch.full_like(zs, math.nan)
        CPP.grad(zs, zt, labels, coef, spec, out)
        assert (out[[1, 3]] == 0).all() and not torch.signbit(out[[1, 3]]).any()
        assert torch.isfinite(out[[0, 2]]).all()


def test_nan_propagates_to_its_row_only():
    zs = make_logits(4, 400, torch.float32, CPU, seed=19).clone()
    zt = make_logits(4, 400, torch.float32, CPU, seed=20).clone()
    zs[2, 123] = math.nan
    labels = make_labels(4, 400, CPU)
    for div in DIVERGENCES:
        check_all(CPP, zs, zt, labels, spec_of(div, 1.0, ce=True))
        stats = CPP.stats(zs, zt, labels, spec_of(div, 1.0, ce=True))
        n = norms_of(stats)
        assert torch.isnan(n[2, :2]).any() and torch.isfinite(n[[0, 1, 3]]).all()


def test_masked_columns_at_minus_inf_match_torch():
    # -inf logits (a masked vocabulary slice) must not poison the online max/sum.
    zs = make_logits(3, 3000, torch.float32, CPU, seed=21).clone()
    zt = make_logits(3, 3000, torch.float32, CPU, seed=22).clone()
    zs[:, :1500] = -math.inf  # whole leading tiles of -inf, then finite values
    zt[:, 2000:] = -math.inf
    for div in ("forward_kl", "reverse_kl"):
        check_stats(CPP, zs, zt, make_labels(3, 3000, CPU), spec_of(div, 1.0, ce=True))


def test_hard_label_ce_only_term():
    zs = make_logits(8, 640, torch.float32, CPU, seed=23)
    zt = make_logits(8, 640, torch.float32, CPU, seed=24)
    labels = make_labels(8, 640, CPU)
    spec = spec_of("forward_kl", 2.0, ce=True)
    stats = check_stats(CPP, zs, zt, labels, spec)
    coef = coefficients(stats)
    coef[:, COEF.kd] = 0.0  # CE only: dz = ce * (softmax(z) - onehot)
    out = check_grad(CPP, zs, zt, labels, coef, spec)
    # Each row sums to ce * (1 - [label in this block]): softmax sums to 1, the one-hot to 1.
    want = coef[:, COEF.ce] * (labels < 0)
    assert torch.allclose(out.sum(1), want, atol=1e-5), (out.sum(1), want)


def _consts(**named) -> list[float]:
    """RowSpec.consts of a forward KL spec, with some constants replaced by name."""
    consts = list(spec_of("forward_kl").consts)
    for name, value in named.items():
        consts[getattr(CONSTS, name)] = value
    return consts


@pytest.mark.parametrize("bad,match", [
    (lambda a: dict(a, zs=a["zs"].double()), "zs must be float32, bfloat16 or float16"),
    (lambda a: dict(a, zt=a["zt"][:, :-1]), "zt must have shape"),
    (lambda a: dict(a, zs=a["zs"].t().contiguous().t()), "zs must have unit column stride"),
    (lambda a: dict(a, labels=a["labels"].int()), "labels must be Long"),
    (lambda a: dict(a, labels=torch.full_like(a["labels"], 64)), r"labels must hold -1 or"),
    (lambda a: dict(a, coef=a["coef"][:, :6].contiguous()), "coef must have shape"),
    (lambda a: dict(a, out=a["out"].double()), "out must be float32"),
    (lambda a: dict(a, div=len(TABLE)), rf"div must be a divergence code in \[0, {len(TABLE)}\)"),
    (lambda a: dict(a, div=-1), "div must be a divergence code"),
    (lambda a: dict(a, consts=a["consts"][:-1]), f"consts must be a list of {len(CONSTS)} "
     "floats in kdkernels.layouts.CONSTS order"),
    (lambda a: dict(a, consts=_consts(inv_t=0.0)), r"consts\[inv_t\] \(1 / temperature\) "
     "must be > 0"),
    (lambda a: dict(a, consts=_consts(inv_t=1e300)), "finite in float32"),
    (lambda a: dict(a, consts=_consts(inv_t=math.inf)), r"consts\[0\] must be finite"),
    (lambda a: dict(a, consts=_consts(tempered=0.5)), r"consts\[tempered\] must be 0 or 1"),
    (lambda a: dict(a, consts=_consts(cap_t=-1.0)), r"consts\[cap_s\] and consts\[cap_t\] "
     "must be >= 0"),
    (lambda a: dict(a, consts=_consts(w_q=1.5)), r"consts\[w_q\] must be in \[0, 1\]"),
    (lambda a: dict(a, consts=_consts(mix_kind=3.0)), r"consts\[mix_kind\] must be a "
     r"MIX_KINDS index in \[0, 3\)"),
    (lambda a: dict(a, consts=_consts(mix_kind=0.5)), r"consts\[mix_kind\] must be a"),
    (lambda a: dict(a, consts=_consts(stats_weight=-1.0)), r"consts\[stats_weight\] must be "
     "a STATS_WEIGHTS index"),
])
def test_bad_arguments_raise_naming_the_argument(bad, match):
    zs = make_logits(4, 64, torch.float32, CPU)
    args = dict(zs=zs, zt=zs.clone(), labels=make_labels(4, 64, CPU),
                coef=torch.ones(4, len(COEF)), div=0, consts=_consts(), has_ce=True,
                out=torch.empty(4, 64))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kdkernels.row_grad_(**bad(args))


@pytest.mark.parametrize("div", [d for d in TABLE if not d.needs_mix], ids=lambda d: d.name)
def test_mix_rejects_divergences_without_a_mix_pass(div):
    zs = make_logits(2, 10, torch.float32, CPU)
    with pytest.raises(RuntimeError, match=f"divergence code {div.code} has no mix pass"):
        torch.ops.kdkernels.row_mix(zs, zs, torch.zeros(2, len(NORMS)), div.code,
                                    list(spec_of(div.name).consts))


def test_the_ops_take_the_code_and_the_constants_of_the_spec():
    # One spec, two calls: through the backend and through the op with spec.code / consts.
    zs = make_logits(3, 200, torch.float32, CPU, seed=25)
    zt = make_logits(3, 200, torch.float32, CPU, seed=26)
    labels = make_labels(3, 200, CPU)
    spec = spec_of("alpha", 1.5, alpha=0.3, tcap=12.0, ce=True)
    stats = torch.ops.kdkernels.row_stats(zs, zt, labels, spec.code, list(spec.consts), True)
    assert torch.equal(stats, CPP.stats(zs, zt, labels, spec))
    mix = torch.ops.kdkernels.row_mix(zs, zt, norms_of(stats), spec.code, list(spec.consts))
    assert torch.equal(mix, CPP.mix(zs, zt, norms_of(stats), spec))


# The alpha divergence against float64 formulas of its own (divergences.py):
# D = (1 - sum q^a p^(1-a)) / (a (1 - a)), mix = (sum p + a (q - p) - w, sum w).


def _alpha64(zs, zt, spec):
    a = (zs.double() * spec.inv_t).requires_grad_(True)
    b = zt.double() * spec.inv_t
    logp, logq = torch.log_softmax(a, 1), torch.log_softmax(b, 1)
    al = spec.param("alpha")
    # w = 0 where p = 0 (-inf + inf would be NaN); autograd's where passes 0 to the other side.
    w = torch.exp(torch.where(torch.isneginf(logp), logp, logp + al * (logq - logp)))
    p, q = logp.exp(), logq.exp()
    c0 = (p + al * (q - p) - w).sum(1)
    div = (1.0 - w.sum(1)) / (al * (1.0 - al))
    return a, c0, w.sum(1), div


@pytest.mark.parametrize("alpha", [0.05, 0.35, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_alpha_mix_sums_match_float64(alpha, temperature):
    zs = make_logits(7, 1500, torch.float32, CPU, seed=27)
    zt = make_logits(7, 1500, torch.float32, CPU, seed=28)
    spec = spec_of("alpha", temperature, alpha=alpha)
    mix = CPP.mix(zs, zt, norms_of(CPP.stats(zs, zt, make_labels(7, 1500, CPU), spec)), spec)
    _, c0, c1, _ = _alpha64(zs, zt, spec)
    torch.testing.assert_close(mix[:, MIX.c0].double(), c0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mix[:, MIX.c1].double(), c1, rtol=1e-5, atol=1e-6)
    assert (mix[:, MIX.c0] >= 0).all()


@pytest.mark.parametrize("alpha", [0.1, 0.35, 0.8])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_alpha_grad_matches_float64_autograd(alpha, temperature):
    rows, cols = 6, 1100
    zs = make_logits(rows, cols, torch.float32, CPU, seed=29)
    zt = make_logits(rows, cols, torch.float32, CPU, seed=30)
    labels = make_labels(rows, cols, CPU)
    spec = spec_of("alpha", temperature, alpha=alpha)
    stats = CPP.stats(zs, zt, labels, spec)
    mix = CPP.mix(zs, zt, norms_of(stats), spec)
    a, _, _, div = _alpha64(zs, zt, spec)
    kd = torch.linspace(0.2, 1.3, rows, dtype=torch.float64)
    (want,) = torch.autograd.grad((kd * div).sum(), a)  # d(kd * D)/da: what dz holds
    coef = coefficients(stats)
    coef[:, COEF.aux] = mix[:, MIX.c0]  # aux = c0 = 1 - sum w (divergences.py)
    coef[:, COEF.kd] = kd.float()
    coef[:, COEF.ce] = 0.0
    out = torch.empty_like(zs)
    CPP.grad(zs, zt, labels, coef, spec, out)
    scale = want.abs().amax(1, keepdim=True)
    assert ((out.double() - want).abs() <= 2e-5 * scale + 1e-4 * want.abs()).all(), (
        (out.double() - want).abs().max())
    # Each row of the divergence gradient sums to 0 (softmax Jacobian).
    assert (out.double().sum(1).abs() <= 1e-5 * scale.squeeze(1) * cols ** 0.5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alpha_is_exactly_zero_at_equal_logits(dtype):
    zs = make_logits(5, 2049, dtype, CPU, seed=31)
    for spec in (spec_of("alpha", 1.0, alpha=0.3), spec_of("alpha", 2.5, alpha=0.7, scap=20.0,
                                                           tcap=20.0)):
        mix = CPP.mix(zs, zs, norms_of(CPP.stats(zs, zs, make_labels(5, 2049, CPU), spec)), spec)
        assert (mix[:, MIX.c0] == 0).all(), mix[:, MIX.c0]


def test_alpha_with_minus_inf_logits_is_finite():
    zs = make_logits(4, 700, torch.float32, CPU, seed=32).clone()
    zt = make_logits(4, 700, torch.float32, CPU, seed=33).clone()
    zs[:, :100] = -math.inf  # p = 0 where q > 0
    zt[:, 100:200] = -math.inf  # q = 0 where p > 0
    zs[:, 600:] = zt[:, 600:] = -math.inf  # both 0
    labels = make_labels(4, 700, CPU)
    spec = spec_of("alpha", 1.3, alpha=0.4, ce=True)
    stats = CPP.stats(zs, zt, labels, spec)
    mix = CPP.mix(zs, zt, norms_of(stats), spec)
    assert torch.isfinite(stats).all()
    assert torch.isfinite(mix).all(), mix
    _, c0, c1, _ = _alpha64(zs, zt, spec)
    torch.testing.assert_close(mix[:, MIX.c0].double(), c0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mix[:, MIX.c1].double(), c1, rtol=1e-5, atol=1e-6)
    coef = coefficients(stats)
    coef[:, COEF.aux] = mix[:, MIX.c0]
    out = torch.full_like(zs, math.nan)
    CPP.grad(zs, zt, labels, coef, spec, out)
    assert torch.isfinite(out).all()
    # Where p = 0 the divergence part is exactly 0 (only CE's softmax, also 0 there).
    assert (out[:, :100][labels.unsqueeze(1) != torch.arange(100)] == 0).all()


def test_alpha_nan_logits_give_nan():
    zs = make_logits(3, 300, torch.float32, CPU, seed=34).clone()
    zt = make_logits(3, 300, torch.float32, CPU, seed=35).clone()
    zt[1, 17] = math.nan
    spec = spec_of("alpha", 1.0, alpha=0.5)
    labels = make_labels(3, 300, CPU)
    stats = CPP.stats(zs, zt, labels, spec)
    mix = CPP.mix(zs, zt, norms_of(stats), spec)
    assert torch.isnan(mix[1]).all() and torch.isfinite(mix[[0, 2]]).all()


def test_backend_reasons():
    spec = spec_of("forward_kl")
    assert CPP.not_supported_reasons(CPU, torch.bfloat16, spec) == []
    assert "float64" in " ".join(CPP.not_supported_reasons(CPU, torch.float64, spec))
    assert "CPU tensors" in " ".join(
        CPP.not_supported_reasons(torch.device("cuda"), torch.float32, spec))
    assert registry.select("auto", CPU, torch.bfloat16, spec).name == "cpp"
