"""The student-only row ops (student_stats, student_grad) of every backend that has them,
against float64 formulas of the contract in backends/base.py, on random logits with masked
(-inf) columns, softcaps, temperatures, CE and row strides.

Tolerances: both sides read the same stored logits; the backend computes in fp32, so its sums
carry ~n * 2^-24 relative rounding and its exps (torch's and the C++/Triton ones) a few ulp:
2e-5 relative on the sums. The gradient's exp((a - m) - log_s) moves by ~|a - m| * 2^-24
relative from the fp32 subtraction, covered by 1e-5 relative plus 1e-7 absolute per element
(values are probabilities times coefficients of order 1). A 16-bit ``out`` adds one storage
rounding (2^-8 bf16, 2^-11 fp16 relative).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdkernels.backends import registry
from kdkernels.backends.base import RowSpec
from kdkernels.layouts import SCOEF, SSTATS

from .conftest import CPU

OUT_ULP = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def student_backends() -> list[str]:
    spec = RowSpec.build("forward_kl")
    out = []
    for name in ("torch", "cpp", "triton"):
        if registry.reasons(name, CPU, torch.float32, spec):
            continue
        if registry.load(name).student_stats is not None:
            out.append(name)
    return out


BACKENDS = student_backends()


def _spec(temperature: float, cap: float | None, ce: bool) -> RowSpec:
    return RowSpec.build("forward_kl", temperature=temperature, student_softcap=cap, has_ce=ce)


def _oracle_z(zs: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = zs.double()
    masked = torch.isneginf(x)
    z = x if cap is None else torch.where(masked, x, cap * torch.tanh(x / cap))
    return z, masked


def _max_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.amax(1)
    safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return m, torch.exp(x - safe[:, None]).sum(1)


def _xexp_sum(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum exp(x - m) (x - m) over the unmasked columns (0 for a row with none)."""
    d = x - torch.where(torch.isneginf(m), torch.zeros_like(m), m)[:, None]
    return torch.where(torch.isneginf(x), 0.0, torch.exp(d) * d).sum(1)


def oracle_stats(zs, spec: RowSpec) -> torch.Tensor:
    z, _ = _oracle_z(zs, spec.student_softcap)
    m_a, s_a = _max_sum(z * spec.inv_t)
    m_z, s_z = _max_sum(z) if spec.ce_separate else (m_a, s_a)
    e_a = _xexp_sum(z * spec.inv_t, m_a)
    return torch.stack([dict(m_a=m_a, s_a=s_a, m_z=m_z, s_z=s_z, e_a=e_a)[k] for k in SSTATS],
                       1)


def oracle_grad(zs, labels, coef, spec: RowSpec, *, magnitude: bool = False) -> torch.Tensor:
    """The gradient rows in float64; with magnitude=True the sum of its terms' absolute
    values instead (the scale fp32 rounding is relative to where kd, ce and the label's
    one-hot cancel)."""
    z, masked = _oracle_z(zs, spec.student_softcap)
    c = {k: coef[:, i].double()[:, None] for i, k in enumerate(SCOEF)}
    if magnitude:
        c = {k: v.abs() for k, v in c.items()} | {k: c[k] for k in ("m_a", "log_s_a", "m_z",
                                                                     "log_s_z")}
    a = z * spec.inv_t
    out = torch.where(c["kd"] != 0, c["kd"] * torch.exp((a - c["m_a"]) - c["log_s_a"]), 0.0)
    if spec.has_ce:
        if spec.ce_separate:
            out = out + torch.where(c["ce"] != 0,
                                    c["ce"] * torch.exp((z - c["m_z"]) - c["log_s_z"]), 0.0)
        onehot = torch.zeros_like(out)
        rows = (labels >= 0).nonzero()[:, 0]
        onehot[rows, labels[rows]] = 1.0
        out = out + c["ce"] * onehot if magnitude else out - c["ce"] * onehot
    if spec.student_softcap is not None:
        out = out * (1 - torch.tanh(torch.where(masked, 0.0, zs.double())
                                    / spec.student_softcap) ** 2)
    return torch.where(masked, 0.0, out)


def make_rows(rows, cols, dtype, *, mask_frac, seed, stride_pad=0, all_masked_row=False):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols + stride_pad, generator=gen, dtype=torch.float64) * 4
    zs = base.to(dtype)[:, :cols]
    mask = torch.rand(rows, cols, generator=gen) < mask_frac
    if all_masked_row and rows > 1:
        mask[1] = True
    zs[mask] = -math.inf
    labels = torch.randint(0, cols, (rows,), generator=gen)
    labels[::3] = -1
    labels = torch.where(mask.gather(1, labels.clamp(min=0)[:, None])[:, 0],
                         torch.full_like(labels, -1), labels)  # never a masked column
    return zs, labels, mask


def coefficients(stats: torch.Tensor, spec: RowSpec, seed: int) -> torch.Tensor:
    """Coefficients as the driver forms them: the full normalisers shifted by a log-scale,
    signed kd, ce; one row with kd == ce == 0 (an ignored token)."""
    gen = torch.Generator().manual_seed(seed)
    rows = stats.shape[0]
    fold = torch.randn(rows, generator=gen, dtype=torch.float64) * 2
    kd = torch.randn(rows, generator=gen, dtype=torch.float64)
    ce = torch.rand(rows, generator=gen, dtype=torch.float64) if spec.has_ce \
        else torch.zeros(rows, dtype=torch.float64)
    kd[0] = ce[0] = 0.0
    s = stats.double()
    named = dict(m_a=s[:, SSTATS.m_a], log_s_a=torch.log(s[:, SSTATS.s_a]) - fold,
                 m_z=s[:, SSTATS.m_z], log_s_z=torch.log(s[:, SSTATS.s_z]), kd=kd, ce=ce)
    return torch.stack([named[k] for k in SCOEF], 1).float()


def _check(name, got, want, rtol, atol, scale=None):
    """|got - want| <= atol + rtol * scale elementwise; scale defaults to |want|."""
    got, want = got.double(), want.double()
    assert torch.isnan(got).sum() == torch.isnan(want).sum() == 0, f"{name}: NaN"
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{name}: inf pattern"
    fin = torch.isfinite(want)
    err = (got[fin] - want[fin]).abs()
    bound = atol + rtol * (want.abs() if scale is None else scale.double())[fin]
    assert (err <= bound).all(), (f"{name}: worst excess {(err - bound).max().item():.3g}, "
                                  f"got {got[fin][err > bound][:3].tolist()} want "
                                  f"{want[fin][err > bound][:3].tolist()}")


def run_case(impl, rows, cols, dtype, temperature, cap, ce, mask_frac, seed, out_dtype,
             stride_pad=0):
    backend = registry.load(impl)
    spec = _spec(temperature, cap, ce)
    zs, labels, mask = make_rows(rows, cols, dtype, mask_frac=mask_frac, seed=seed,
                                 stride_pad=stride_pad, all_masked_row=True)
    stats = backend.student_stats(zs, spec)
    assert stats.shape == (rows, len(SSTATS)) and stats.dtype == torch.float32
    want = oracle_stats(zs, spec)
    # Row maxima are exact when nothing rounds a (T == 1, no softcap), else a few ulp.
    # e_a = sum e^(a - m) (a - m): each factor a - m carries fp32 rounding of a and m, an
    # absolute error of about ulp(|m|), so e_a's error scales with s_a |m_a|, not with |e_a|
    # (seen: two near-equal capped logits at -3.5 give e_a = -0.0079, off by 3.4e-7).
    w = want.double()
    scale = w.abs()
    m_a = torch.where(torch.isfinite(w[:, SSTATS.m_a]), w[:, SSTATS.m_a].abs(), 0.0)
    scale[:, SSTATS.e_a] = torch.maximum(scale[:, SSTATS.e_a], w[:, SSTATS.s_a] * m_a)
    _check(f"{impl} stats", stats, want, 2e-5, 0.0, scale)
    coef = coefficients(stats, spec, seed + 1)
    out = torch.full((rows, cols), float("nan"), dtype=out_dtype)  # poisoned
    backend.student_grad(zs, labels, coef, spec, out)
    ref = oracle_grad(zs, labels, coef, spec)
    assert torch.equal(out[0], torch.zeros(cols, dtype=out_dtype)), "ignored row must be 0"
    assert (out[mask] == 0).all(), "masked columns must be exactly 0"
    # Relative to the terms' magnitude, not their sum: at T != 1 with CE the kd, ce and
    # one-hot terms of an element can cancel (seen: 2e-5 of the result, 3e-7 of the terms).
    mag = oracle_grad(zs, labels, coef, spec, magnitude=True)
    rtol = 1e-5 + OUT_ULP[out_dtype]
    if spec.student_softcap is not None:
        # The softcap's derivative 1 - t^2 (t = tanh(z / cap)) cancels where |z| >> cap: an
        # error of a few ulp in fp32's t grows by 2 t^2 / (1 - t^2) in it (seen: z / cap ~ 2,
        # 4.9e-5 of the result). Allow 8 ulp (2^-20) of t through that amplification.
        t = torch.tanh(torch.where(mask, 0.0, zs.double()) / spec.student_softcap)
        mag = mag * (1 + 2 * t**2 / (1 - t**2) * 2.0**-20 / rtol)
    _check(f"{impl} grad", out, ref, rtol, 1e-7, mag)


@pytest.mark.skipif(not BACKENDS, reason="no backend with student row ops")
@pytest.mark.parametrize("impl", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(2, 9), cols=st.sampled_from([1, 2, 7, 31, 97, 257, 1031]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       temperature=st.sampled_from([1.0, 0.7, 2.5]),
       cap=st.sampled_from([None, 5.0]), ce=st.booleans(),
       mask_frac=st.sampled_from([0.0, 0.1, 0.6]), seed=st.integers(0, 2**16),
       stride_pad=st.sampled_from([0, 3]))
def test_student_row_ops_match_float64(impl, rows, cols, dtype, temperature, cap, ce,
                                       mask_frac, seed, stride_pad):
    run_case(impl, rows, cols, dtype, temperature, cap, ce, mask_frac, seed, torch.float32,
             stride_pad)


@pytest.mark.skipif(not BACKENDS, reason="no backend with student row ops")
@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_student_grad_into_half_out(impl, out_dtype):
    run_case(impl, 5, 263, torch.float32, 2.0, None, True, 0.2, 7, out_dtype)


@pytest.mark.skipif(not BACKENDS, reason="no backend with student row ops")
@pytest.mark.parametrize("impl", BACKENDS)
def test_student_grad_in_place(impl):
    """out may alias zs (the driver writes dL/dz over the logits chunk)."""
    backend = registry.load(impl)
    spec = _spec(1.5, 4.0, True)
    zs, labels, _ = make_rows(6, 301, torch.float32, mask_frac=0.3, seed=3)
    coef = coefficients(backend.student_stats(zs, spec), spec, 4)
    ref = torch.full_like(zs, float("nan"))
    backend.student_grad(zs, labels, coef, spec, ref)
    buf = zs.clone()
    backend.student_grad(buf, labels, coef, spec, buf)
    torch.testing.assert_close(buf, ref, rtol=0, atol=0)
