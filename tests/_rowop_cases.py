"""Shared checks of a compiled row-op backend (cpp, cuda) against the torch reference backend.

Both sides compute in fp32 from the same stored logits, so the tolerances below only cover
fp32 rounding and the compiled side's exp (torch's exp_u20 on CPU: <= 20 ulp, ~2.4e-6
relative; __expf/expf on CUDA: a few ulp), not the storage dtype of the inputs. Outputs
stored in bf16/fp16 may differ by one storage ulp where the two fp32 values straddle a
rounding boundary.
"""

from __future__ import annotations

import math

import torch

from kdkernels.backends import torch_rows
from kdkernels.backends.base import Backend, RowSpec
from kdkernels.divergences import NAMES
from kdkernels.layouts import COEF, MIX, STATS
from kdkernels.row_stats import finish, norms

DIVERGENCES = NAMES  # every row of the divergence table

# Relative error allowed on sums of n fp32 terms of one sign (stats s columns, mix sums).
RTOL = 2e-5
STORAGE_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def spec_of(div: str, temperature: float = 1.0, *, beta: float = 0.3, skew: float = 0.2,
            alpha: float = 0.35, scap: float | None = None, tcap: float | None = None,
            ce: bool = False, scale_s: float = 1.0, scale_t: float = 1.0) -> RowSpec:
    return RowSpec.build(div, temperature=temperature, beta=beta, skew=skew, alpha=alpha,
                         student_softcap=scap, teacher_softcap=tcap, has_ce=ce,
                         student_logit_scale=scale_s, teacher_logit_scale=scale_t)


def make_logits(rows: int, cols: int, dtype: torch.dtype, device, *, scale: float = 4.0,
                row_stride: int | None = None, seed: int = 0) -> torch.Tensor:
    """Random logits [rows, cols], optionally a view with row stride > cols."""
    gen = torch.Generator().manual_seed(seed)
    width = row_stride or cols
    base = (torch.randn(rows, width, generator=gen) * scale).to(dtype).to(device)
    return base[:, :cols]


def make_labels(rows: int, cols: int, device, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cols, (rows,), generator=gen)
    labels[::3] = -1  # label outside this block / no label
    return labels.to(device)


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, atol: torch.Tensor | float,
           rtol: float) -> None:
    got, ref = got.double().cpu(), ref.double().cpu()
    atol = atol.double().cpu() if isinstance(atol, torch.Tensor) else atol
    same_nan = torch.isnan(got) == torch.isnan(ref)
    assert same_nan.all(), f"{name}: NaN pattern differs at {(~same_nan).nonzero()[:5].tolist()}"
    both = ~torch.isnan(ref)
    inf_ok = (torch.isinf(ref) == torch.isinf(got)) & (~torch.isinf(ref) | (got == ref))
    assert (inf_ok | ~both).all(), f"{name}: inf pattern differs"
    fin = both & torch.isfinite(ref)
    err = (got - ref).abs()
    bound = torch.as_tensor(atol, dtype=torch.float64).expand_as(ref) + rtol * ref.abs()
    bad = fin & (err > bound)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {int(fin.sum())} values differ; worst "
                           f"got {got[bad][:3].tolist()} want {ref[bad][:3].tolist()}")


def check_stats(backend: Backend, zs, zt, labels, spec: RowSpec) -> torch.Tensor:
    got = backend.stats(zs, zt, labels, spec)
    ref = torch_rows.stats(zs, zt, labels, spec)
    assert got.shape == ref.shape == (zs.shape[0], len(STATS)) and got.dtype == torch.float32
    # With T == 1 and no softcap the max and label columns are exact (no rounding on either
    # side). Otherwise x / c, tanh, z / T round differently (the kernel multiplies by
    # reciprocals): a few ulp of a, which also moves each exp(a - m) by ~1e-6 * |a|.
    za = torch_rows._capped(zs.float() * spec.const("scale_s"), spec.student_softcap) * spec.inv_t
    zb = torch_rows._capped(zt.float() * spec.const("scale_t"), spec.teacher_softcap) * spec.inv_t
    plain = (not spec.tempered and spec.student_softcap is None and spec.teacher_softcap is None
             and spec.const("scale_s") == spec.const("scale_t") == 1.0)
    big = torch.nan_to_num(torch.maximum(za.abs().amax(1), zb.abs().amax(1)), nan=0.0,
                           posinf=0.0)
    shift = 0.0 if plain else 1e-6
    for name in ("m_a", "m_b", "m_z"):
        col = getattr(STATS, name)
        _close(f"stats {name}", got[:, col], ref[:, col], 0.0, shift)
    _close("stats z_label", got[:, STATS.z_label], ref[:, STATS.z_label], 0.0,
           0.0 if spec.student_softcap is None else 1e-6)  # x * scale rounds alike on both
    # s columns: sums of positive terms; w columns: bounded by s * max|b - a| of the row.
    for name in ("s_a", "s_b", "s_z"):
        col = getattr(STATS, name)
        _close(f"stats {name}", got[:, col], ref[:, col], 1e-30,
               RTOL + shift * float(big.max()))
    # e_a = sum exp(a - m_a) (a - m_a): terms of one sign, each at most |a - m_a| times its
    # exp, so the s-column bound scaled by the row's spread of a (plus one for the exp).
    spread = torch.nan_to_num(za.amax(1) - za.amin(1), nan=0.0, posinf=0.0)
    _close("stats e_a", got[:, STATS.e_a], ref[:, STATS.e_a],
           (RTOL + shift * big) * ref[:, STATS.s_a].abs() * (spread + 1) + 1e-30, RTOL)
    span = torch.nan_to_num((zb - za).abs().amax(1), nan=0.0, posinf=0.0)
    for col, s_col in ((STATS.w_a, STATS.s_a), (STATS.w_b, STATS.s_b)):
        _close(f"stats[:, {col}]", got[:, col], ref[:, col],
               (RTOL + shift * big) * ref[:, s_col].abs() * (span + 1) + 1e-30, RTOL)
    return ref


def norms_of(stats: torch.Tensor) -> torch.Tensor:
    """[C, len(NORMS)] (m_a, log_s_a, m_b, log_s_b) of merged stats: the mix pass's input."""
    return norms(finish(stats))


def check_mix(backend: Backend, zs, zt, row_norms, spec: RowSpec) -> None:
    got = backend.mix(zs, zt, row_norms, spec)
    ref = torch_rows.mix(zs, zt, row_norms, spec)
    assert got.shape == ref.shape == (zs.shape[0], len(MIX)) and got.dtype == torch.float32
    # Sums of probability-weighted log ratios: |terms| sum to at most a few units at these
    # logit scales, so an absolute floor of 1e-5 sits ~10x above the fp32/exp rounding.
    _close("mix", got, ref, 1e-5, 1e-4)


def coefficients(stats: torch.Tensor, *, seed: int = 2, dead_rows=()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = finish(stats.cpu())
    c = stats.shape[0]
    coef = torch.stack((t.m_a, t.log_s_a, t.m_b, t.log_s_b, t.m_z, t.log_s_z,
                        torch.rand(c, generator=gen) * 0.5, torch.rand(c, generator=gen) + 0.1,
                        torch.rand(c, generator=gen) + 0.1), 1)
    for r in dead_rows:
        coef[r, COEF.kd] = coef[r, COEF.ce] = 0.0
    return coef.to(stats.device)


def check_grad(backend: Backend, zs, zt, labels, coef, spec: RowSpec, *, out_dtype=None,
               alias: bool = False) -> torch.Tensor:
    out_dtype = out_dtype or zs.dtype
    ref = torch.empty(zs.shape, dtype=out_dtype, device=zs.device)
    torch_rows.grad(zs, zt, labels, coef, spec, ref)
    if alias:
        zs_in = zs.clone()
        out = zs_in
    else:
        zs_in = zs
        out = torch.full(zs.shape, math.nan, dtype=out_dtype, device=zs.device)  # poison
    backend.grad(zs_in, zt, labels, coef, spec, out)
    # |dz| <= |kd| * O(1 + |log-ratio|) + |ce|; the absolute floor is relative to the row's
    # largest gradient, the relative part covers one storage ulp of bf16/fp16 outputs.
    scale = torch.nan_to_num(ref.float().abs().amax(1, keepdim=True), nan=1.0, posinf=1.0)
    rtol = max(4e-5, 2 * STORAGE_ULP[out_dtype])
    _close("grad", out.float(), ref.float(), 4e-5 * scale + 1e-30, rtol)
    return out


def check_all(backend: Backend, zs, zt, labels, spec: RowSpec, **grad_kw) -> None:
    stats = check_stats(backend, zs, zt, labels, spec)
    if spec.needs_mix:
        check_mix(backend, zs, zt, norms_of(stats), spec)
    coef = coefficients(stats, dead_rows=range(1, zs.shape[0], 4))
    out = check_grad(backend, zs, zt, labels, coef, spec, **grad_kw)
    dead = coef[:, 7:].abs().sum(1) == 0
    assert (out[dead] == 0).all(), "rows with zero coefficients must get exact zeros"
