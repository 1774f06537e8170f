"""The student-only row ops of the extension backends (kdkernels::student_stats and
kdkernels::student_grad_, csrc/): the paths that tests/test_student_rows.py's small shapes do
not reach (vocab blocks of one row split across threads, whole masked tiles, the skipped
terms with infinite normalisers, garbage in ignored rows), opcheck on both ops and their
fake impls. Compared with the same float64 formulas."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from kdkernels.backends.base import RowSpec
from kdkernels.layouts import CONSTS, SCOEF, SSTATS

from .test_student_rows import _check, coefficients, oracle_grad, oracle_stats, run_case

if shutil.which("c++") is None:
    pytest.skip("no C++ compiler on PATH: the ops cannot be built", allow_module_level=True)

from kdkernels.backends import (
    extension,  # noqa: E402
    registry,  # noqa: E402
)

extension.load_cpu()
OPS = torch.ops.kdkernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _spec(temperature=1.0, cap=None, ce=False) -> RowSpec:
    return RowSpec.build("forward_kl", temperature=temperature, student_softcap=cap, has_ce=ce)


def _backend():
    backend = registry.load("cpp")
    assert not isinstance(backend, str), backend
    return backend


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 50000), (2, 20011), (3, 12289)])
@pytest.mark.parametrize("temperature,cap,ce", [(1.0, None, False), (0.6, 5.0, True),
                                                (2.5, None, True)])
def test_vocab_split_rows(dtype, rows, cols, temperature, cap, ce):
    # Fewer rows than 4 per thread: each row is cut into vocab blocks merged afterwards.
    run_case("cpp", rows, cols, dtype, temperature, cap, ce, 0.3, rows * 7 + cols, torch.float32,
             stride_pad=5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("spec", [_spec(), _spec(0.7, 4.0, True)], ids=["plain", "t_cap_ce"])
def test_masked_tiles_and_rows(threads, spec):
    """Whole tiles (1024 columns) and whole vocab blocks masked before, between and after
    unmasked columns, a row with only its last column unmasked, a fully masked row."""
    cols = 9000
    zs = torch.randn(6, cols, generator=torch.Generator().manual_seed(5)) * 3
    zs[0, :5000] = -math.inf          # the running max starts after masked tiles
    zs[1, 2000:] = -math.inf          # masked tiles after a finite max
    zs[2, 1000:4100] = -math.inf      # a masked gap
    zs[3, :-1] = -math.inf            # one unmasked column, in the remainder
    zs[4] = -math.inf                 # nothing unmasked: m = -inf, s = 0
    labels = torch.tensor([6000, 5, -1, cols - 1, -1, 17])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (slice(0, 6), slice(0, 2), slice(3, 5)):  # row splits and whole rows
            z = zs[rows]
            stats = _backend().student_stats(z, spec)
            want = oracle_stats(z, spec)
            _check("stats", stats, want, 2e-5, 0.0)
            coef = coefficients(stats, spec, 3)
            coef[:, SCOEF.kd] = torch.where(coef[:, SCOEF.kd] == 0, 0.5, coef[:, SCOEF.kd])
            out = torch.full_like(z, math.nan)
            lab = labels[rows] if spec.has_ce else torch.full_like(labels[rows], -1)
            _backend().student_grad(z, lab, coef, spec, out)
            ref = oracle_grad(z, lab, coef, spec)
            _check("grad", out, ref, 1e-5, 1e-7)
            assert (out[torch.isneginf(z)] == 0).all()
    finally:
        torch.set_num_threads(old)
    full = _backend().student_stats(zs, spec)
    assert full[4, SSTATS.m_a] == -math.inf and full[4, SSTATS.s_a] == 0


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_skipped_terms_and_ignored_rows(out_dtype):
    """kd == 0 skips the kd exp (its normaliser may be +inf), ce == 0 the CE terms; a row with
    both 0 gets exact zeros even when its logits are NaN / inf."""
    spec = _spec(2.0, 6.0, True)
    zs = torch.randn(4, 3001, generator=torch.Generator().manual_seed(9)) * 4
    zs[:, ::7] = -math.inf
    stats = _backend().student_stats(zs, spec)
    coef = coefficients(stats, spec, 11)
    coef[1, SCOEF.kd], coef[1, SCOEF.log_s_a], coef[1, SCOEF.ce] = 0.0, math.inf, 0.7
    coef[2, SCOEF.ce], coef[2, SCOEF.log_s_z], coef[2, SCOEF.kd] = 0.0, math.inf, -1.3
    coef[3, SCOEF.kd] = coef[3, SCOEF.ce] = 0.0
    coef[3, SCOEF.m_a] = coef[3, SCOEF.log_s_a] = math.nan
    labels = torch.tensor([3, 8, 9, 10])
    ref = oracle_grad(zs, labels, coef, spec)
    zs[3] = torch.tensor([math.nan, math.inf, -math.inf, 1e30]).repeat(751)[:3001]
    out = torch.full(zs.shape, math.nan, dtype=out_dtype)
    _backend().student_grad(zs, labels, coef, spec, out)
    assert torch.equal(out[3], torch.zeros(3001, dtype=out_dtype))
    ulp = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
    _check("grad", out[:3], ref[:3], 1e-5 + ulp[out_dtype], 1e-7)


def test_in_place_bf16_split_rows():
    """out aliasing a bf16 zs, rows cut into vocab blocks: same bits as a separate out."""
    spec = _spec(0.8, 10.0, True)
    zs = (torch.randn(2, 30000, generator=torch.Generator().manual_seed(2)) * 5).bfloat16()
    zs[:, 100::13] = -math.inf
    labels = torch.tensor([4, -1])
    coef = coefficients(_backend().student_stats(zs, spec), spec, 1)
    coef[0] = coef[1]
    ref = torch.empty_like(zs)
    _backend().student_grad(zs, labels, coef, spec, ref)
    buf = zs.clone()
    _backend().student_grad(buf, labels, coef, spec, buf)
    assert torch.equal(buf, ref)


def test_argument_checks():
    spec = _spec(2.0, None, True)
    consts = list(spec.consts)
    zs = torch.randn(3, 50)
    labels = torch.tensor([0, -1, 49])
    coef = torch.zeros(3, len(SCOEF))
    bad = [
        (lambda: OPS.student_stats(zs.double(), consts, True), "zs must be float32"),
        (lambda: OPS.student_stats(zs[0], consts, True), "zs must be a 2-D"),
        (lambda: OPS.student_stats(zs.t(), consts, True), "unit column stride"),
        (lambda: OPS.student_stats(zs, consts[:-1], True), "consts must be a list"),
        (lambda: OPS.student_grad_(zs, labels, coef[:, :-1], consts, True, zs), "coef must"),
        (lambda: OPS.student_grad_(zs, labels.int(), coef, consts, True, zs), "labels must"),
        (lambda: OPS.student_grad_(zs, torch.tensor([0, 50, 1]), coef, consts, True, zs),
         "labels must hold -1 or a column"),
        (lambda: OPS.student_grad_(zs, labels, coef, consts, True, zs[:2]), "out must have"),
        (lambda: OPS.student_grad_(zs, labels, coef, consts, True, zs.double()), "out must be"),
    ]
    for call, match in bad:
        with pytest.raises(RuntimeError, match=match):
            call()
    # zero rows / columns are fine
    assert OPS.student_stats(torch.empty(0, 8), consts, True).shape == (0, len(SSTATS))
    OPS.student_grad_(torch.empty(2, 0), labels[:2].clamp(max=-1), coef[:2], consts, True,
                      torch.empty(2, 0))


SPECS = {"plain": _spec(), "t_ce": _spec(2.0, None, True), "cap_ce_t1": _spec(1.0, 20.0, True),
         "t_cap": _spec(0.7, 15.0, False)}


def _inputs(dtype=torch.bfloat16, rows=5, cols=301):
    gen = torch.Generator().manual_seed(21)
    zs = (torch.randn(rows, cols, generator=gen) * 3).to(dtype)
    zs[:, ::11] = -math.inf
    labels = torch.tensor([0, 5, -1, 300, 17])[:rows]
    return zs, labels


@pytest.mark.parametrize("spec", SPECS.values(), ids=list(SPECS))
def test_opcheck_student_stats(spec):
    zs, _ = _inputs()
    torch.library.opcheck(OPS.student_stats, (zs, list(spec.consts), spec.has_ce))


@pytest.mark.parametrize("spec", SPECS.values(), ids=list(SPECS))
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_opcheck_student_grad(spec, out_dtype):
    zs, labels = _inputs()
    coef = coefficients(OPS.student_stats(zs, list(spec.consts), spec.has_ce), spec, 5)
    out = torch.full(zs.shape, math.nan, dtype=out_dtype)
    torch.library.opcheck(OPS.student_grad_,
                          (zs, labels, coef, list(spec.consts), spec.has_ce, out))


def test_student_ops_trace_under_torch_compile():
    zs, labels = _inputs(torch.float32)
    spec = SPECS["t_ce"]
    consts = list(spec.consts)

    def rows(zs, labels, coef):
        stats = OPS.student_stats(zs, consts, True)
        out = torch.empty_like(zs)
        OPS.student_grad_(zs, labels, coef, consts, True, out)
        return stats, out

    coef = coefficients(OPS.student_stats(zs, consts, True), spec, 6)
    eager = rows(zs, labels, coef)
    compiled = torch.compile(rows, fullgraph=True, backend="aot_eager")(zs, labels, coef)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)


def test_student_fakes_check_what_the_ops_check():
    from torch._subclasses.fake_tensor import FakeTensorMode

    consts = [0.0] * len(CONSTS)
    with FakeTensorMode():
        zs = torch.empty(4, 32)
        labels = torch.zeros(4, dtype=torch.long)
        coef = torch.empty(4, len(SCOEF))
        out = OPS.student_stats(zs, consts, True)
        assert out.shape == (4, len(SSTATS)) and out.dtype == torch.float32
        bad = [
            (lambda: OPS.student_stats(zs.double(), consts, True), "zs must be float32"),
            (lambda: OPS.student_stats(zs, consts[:3], True), "consts must be"),
            (lambda: OPS.student_grad_(zs, labels, coef[:, :-1], consts, True, zs),
             "coef must have"),
            (lambda: OPS.student_grad_(zs, labels.int(), coef, consts, True, zs),
             "labels must be"),
            (lambda: OPS.student_grad_(zs, labels, coef, consts, True, zs.double()),
             "out must be"),
            (lambda: OPS.student_grad_(zs, labels, coef, consts, True, zs[:, :-1]),
             "out must have"),
        ]
        for call, match in bad:
            with pytest.raises(RuntimeError, match=match):
                call()
