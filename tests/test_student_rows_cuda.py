"""The student-only row ops of the cuda backend (csrc/rows_cuda.cu) on a GPU, against the
float64 formulas of tests/test_student_rows.py: vocab-split grids, unaligned rows, masked
columns, 16-bit outs, in place. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from kdkernels.backends.base import RowSpec

from .test_student_rows import OUT_ULP, _check, coefficients, make_rows, oracle_grad, oracle_stats

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _backend():
    from kdkernels.backends import registry

    backend = registry.load("cuda")
    assert not isinstance(backend, str), backend
    return backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols,pad", [(1, 50000, 0), (3, 4099, 3), (300, 2048, 0),
                                           (5, 7, 1)])
@pytest.mark.parametrize("temperature,cap,ce", [(1.0, None, False), (0.6, 5.0, True),
                                                (2.5, None, True), (1.0, 10.0, True)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_cuda_student_ops_match_float64(dtype, rows, cols, pad, temperature, cap, ce,
                                        out_dtype):
    spec = RowSpec.build("forward_kl", temperature=temperature, student_softcap=cap, has_ce=ce)
    zs, labels, mask = make_rows(rows, cols, dtype, mask_frac=0.3, seed=rows + cols,
                                 stride_pad=pad, all_masked_row=True)
    dev = zs.new_empty(rows, cols + pad, device="cuda")[:, :cols].copy_(zs)
    stats = _backend().student_stats(dev, spec)
    _check("cuda stats", stats.cpu(), oracle_stats(zs, spec), 2e-5, 0.0)
    coef = coefficients(stats.cpu(), spec, 3)
    out = torch.full((rows, cols), float("nan"), dtype=out_dtype, device="cuda")
    _backend().student_grad(dev, labels.cuda(), coef.cuda(), spec, out)
    out = out.cpu()
    assert torch.equal(out[0], torch.zeros(cols, dtype=out_dtype))
    assert (out[mask] == 0).all()
    _check("cuda grad", out, oracle_grad(zs, labels, coef, spec),
           1e-5 + OUT_ULP[out_dtype], 1e-7)
    if dtype == out_dtype:  # in place over the logits: the same values
        _backend().student_grad(dev, labels.cuda(), coef.cuda(), spec, dev)
        assert torch.equal(dev.cpu(), out)
