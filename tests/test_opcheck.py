"""torch.library.opcheck on every kdkernels::* op: schema (declared mutation and aliasing),
fake tensor impls, autograd registration and AOT dispatch (torch.compile's path)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests._rowop_cases import coefficients, make_labels, make_logits, norms_of

if shutil.which("c++") is None:
    pytest.skip("no C++ compiler on PATH: the ops cannot be built", allow_module_level=True)

from kdkernels import _build  # noqa: E402

_build.load_cpu()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
if torch.cuda.is_available():
    _build.load_cuda()
OPS = torch.ops.kdkernels
PARAMS = [("forward_kl", 1.0, 0.5, 0.1, None, None), ("jsd", 2.0, 0.3, 0.1, 30.0, 20.0),
          ("skew_reverse_kl", 0.7, 0.5, 0.25, None, 15.0)]


def _inputs(device, dtype=torch.bfloat16, rows=5, cols=301):
    zs = make_logits(rows, cols, dtype, device, seed=31).contiguous()
    zt = make_logits(rows, cols, torch.float32, device, seed=32).contiguous()
    return zs, zt, make_labels(rows, cols, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: p[0])
def test_opcheck_row_stats(device, params):
    zs, zt, labels = _inputs(device)
    torch.library.opcheck(OPS.row_stats, (zs, zt, labels, *params, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", PARAMS[1:], ids=lambda p: p[0])
def test_opcheck_row_mix(device, params):
    zs, zt, labels = _inputs(device)
    row_norms = norms_of(OPS.row_stats(zs, zt, labels, *params, False))
    torch.library.opcheck(OPS.row_mix, (zs, zt, row_norms, *params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: p[0])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_opcheck_row_grad(device, params, out_dtype):
    zs, zt, labels = _inputs(device)
    coef = coefficients(OPS.row_stats(zs, zt, labels, *params, True), dead_rows=(1,))
    out = torch.full(zs.shape, float("nan"), dtype=out_dtype, device=device)
    torch.library.opcheck(OPS.row_grad_, (zs, zt, labels, coef, *params, True, out))


def test_ops_trace_under_torch_compile():
    zs, zt, labels = _inputs("cpu", torch.float32)
    params = PARAMS[1]

    def rows(zs, zt, labels, coef):
        stats = OPS.row_stats(zs, zt, labels, *params, True)
        out = torch.empty_like(zs)
        OPS.row_grad_(zs, zt, labels, coef, *params, True, out)
        return stats, out

    coef = coefficients(OPS.row_stats(zs, zt, labels, *params, True))
    eager = rows(zs, zt, labels, coef)
    compiled = torch.compile(rows, fullgraph=True, backend="aot_eager")(zs, zt, labels, coef)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)
