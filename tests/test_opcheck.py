"""torch.library.opcheck on every kdkernels::* op: schema (declared mutation and aliasing),
fake tensor impls, autograd registration and AOT dispatch (torch.compile's path)."""

from __future__ import annotations

import shutil

import pytest
import torch

from kdkernels.divergences import TABLE
from kdkernels.layouts import COEF, NORMS, STATS
from tests._rowop_cases import coefficients, make_labels, make_logits, norms_of, spec_of

if shutil.which("c++") is None:
    pytest.skip("no C++ compiler on PATH: the ops cannot be built", allow_module_level=True)

from kdkernels.backends import extension  # noqa: E402

extension.load_cpu()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
if torch.cuda.is_available():
    extension.load_cuda()
OPS = torch.ops.kdkernels
# (div, consts) of a few specs: the ops take the divergence code and RowSpec.consts.
SPECS = {"forward_kl": spec_of("forward_kl"),
         "jsd": spec_of("jsd", 2.0, beta=0.3, scap=30.0, tcap=20.0),
         "skew_reverse_kl": spec_of("skew_reverse_kl", 0.7, skew=0.25, tcap=15.0),
         "alpha": spec_of("alpha", 1.5, alpha=0.35, scap=25.0)}
PARAMS = [(s.code, list(s.consts)) for s in SPECS.values()]
IDS = list(SPECS)
MIX_PARAMS = [p for p, s in zip(PARAMS, SPECS.values(), strict=True) if s.needs_mix]


def _inputs(device, dtype=torch.bfloat16, rows=5, cols=301):
    zs = make_logits(rows, cols, dtype, device, seed=31).contiguous()
    zt = make_logits(rows, cols, torch.float32, device, seed=32).contiguous()
    return zs, zt, make_labels(rows, cols, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_opcheck_row_stats(device, params):
    zs, zt, labels = _inputs(device)
    torch.library.opcheck(OPS.row_stats, (zs, zt, labels, *params, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", MIX_PARAMS, ids=IDS[1:])
def test_opcheck_row_mix(device, params):
    zs, zt, labels = _inputs(device)
    row_norms = norms_of(OPS.row_stats(zs, zt, labels, *params, False))
    torch.library.opcheck(OPS.row_mix, (zs, zt, row_norms, *params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", PARAMS, ids=IDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_opcheck_row_grad(device, params, out_dtype):
    zs, zt, labels = _inputs(device)
    coef = coefficients(OPS.row_stats(zs, zt, labels, *params, True), dead_rows=(1,))
    out = torch.full(zs.shape, float("nan"), dtype=out_dtype, device=device)
    torch.library.opcheck(OPS.row_grad_, (zs, zt, labels, coef, *params, True, out))


def test_ops_trace_under_torch_compile():
    zs, zt, labels = _inputs("cpu", torch.float32)
    params = PARAMS[IDS.index("alpha")]

    def rows(zs, zt, labels, coef):
        stats = OPS.row_stats(zs, zt, labels, *params, True)
        mix = OPS.row_mix(zs, zt, norms_of(stats), *params)
        out = torch.empty_like(zs)
        OPS.row_grad_(zs, zt, labels, coef, *params, True, out)
        return stats, mix, out

    coef = coefficients(OPS.row_stats(zs, zt, labels, *params, True))
    eager = rows(zs, zt, labels, coef)
    compiled = torch.compile(rows, fullgraph=True, backend="aot_eager")(zs, zt, labels, coef)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)


def test_fake_impls_check_what_the_ops_check():
    # Under FakeTensorMode only the meta impls run: a bad call must still fail, naming the
    # argument, as the real op would.
    from torch._subclasses.fake_tensor import FakeTensorMode

    code, consts = PARAMS[IDS.index("alpha")]
    with FakeTensorMode():
        zs = torch.empty(4, 32)
        labels = torch.zeros(4, dtype=torch.long)
        coef = torch.empty(4, len(COEF))
        out = OPS.row_stats(zs, zs, labels, code, consts, True)
        assert out.shape == (4, len(STATS)) and out.dtype == torch.float32
        bad = [
            (lambda: OPS.row_stats(zs, zs[:, :-1], labels, code, consts, True), "zt must have"),
            (lambda: OPS.row_stats(zs, zs, labels.int(), code, consts, True), "labels must be"),
            (lambda: OPS.row_stats(zs, zs, labels, len(TABLE), consts, True),
             "div must be a divergence"),
            (lambda: OPS.row_stats(zs, zs, labels, code, consts[:3], True), "consts must be"),
            (lambda: OPS.row_mix(zs, zs, torch.empty(4, len(NORMS) - 1), code, consts),
             "norms must have"),
            (lambda: OPS.row_mix(zs, zs, torch.empty(4, len(NORMS)), 0, consts),
             "has no mix pass"),
            (lambda: OPS.row_grad_(zs, zs, labels, coef[:, :-1], code, consts, True, zs),
             "coef must have"),
            (lambda: OPS.row_grad_(zs, zs, labels, coef, code, consts, True, zs.double()),
             "out must be"),
            (lambda: OPS.row_grad_(zs.double(), zs, labels, coef, code, consts, True, zs),
             "zs must be float32"),
        ]
        for call, match in bad:
            with pytest.raises(RuntimeError, match=match):
                call()
