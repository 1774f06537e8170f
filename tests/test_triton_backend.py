"""The Triton backend against the torch backend (row-op contract) and the float64 oracle.

On a machine with CUDA every test runs compiled on the GPU; without one, through Triton's
CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), where each program instance
costs ~0.1 s: shapes stay small and tiles large. GPU-only tests (larger shapes) are marked.

Tolerances. Both backends do fp32 math on the same stored values, so stats, mix sums and
fp32 gradients agree to fp32 rounding of sums over <= 3001 terms: 2e-5 relative to the
column's scale (a wrong formula is off by >= 1e-3). Gradients stored in 16 bits are one
rounding of nearly equal fp32 values: identical except at near-ties, one ulp apart, so the
norm-wise error stays far below 2**-9.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdkernels
from kdkernels import divergences, layouts
from kdkernels.backends import registry, torch_rows
from kdkernels.backends.base import RowSpec
from kdkernels.divergences import row_kd_and_aux
from kdkernels.layouts import COEF, MIX, NORMS, STATS
from kdkernels.reference import reference_kd_loss
from kdkernels.row_stats import finish, norms

from ._helpers import make_fused, rel_err, run_fused
from ._rowop_cases import check_all, make_labels, make_logits, spec_of

_loaded = registry.load("triton")
if isinstance(_loaded, str):
    pytest.skip(_loaded, allow_module_level=True)
from kdkernels.backends import triton_rows  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
_why = triton_rows.not_supported_reasons(DEVICE, torch.float32, RowSpec.build("forward_kl"))
if _why:
    pytest.skip("; ".join(_why), allow_module_level=True)

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# The interpreter evaluates masked lanes (-inf - -inf) and dead rows (NaN) through numpy,
# which warns; the kernels discard those lanes.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")]

DIVS = kdkernels.DIVERGENCES
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
STAT_TOL = 2e-5
HALF_GRAD_TOL = 2.0**-9


@dataclass(frozen=True)
class Case:
    div: str = "forward_kl"
    rows: int = 5
    vocab: int = 997
    zs_dtype: torch.dtype = F32
    zt_dtype: torch.dtype = F32
    # alias (in place over zs) | a dtype name for a separate buffer | packed_<dtype> (16-bit
    # dL/dz over the first half of each fp32 zs row, the CUDA driver's layout for big chunks)
    out: str = "alias"
    temperature: float = 1.0
    beta: float = 0.4
    skew: float = 0.1
    alpha: float = 0.35
    cap_s: float | None = None
    cap_t: float | None = None
    ce: bool = True
    pad: int = 0  # row stride = vocab + pad
    dead: tuple[int, ...] = ()  # rows with kd_coef = ce_coef = 0 and garbage logits
    override: tuple[tuple[str, int], ...] = ()  # triton_rows.OVERRIDE (forced vocab split)
    seed: int = 0
    labels: tuple[int, ...] | None = None  # explicit local labels (-1: not in this block)

    def __str__(self) -> str:
        out = "alias" if self.out == "alias" else f"out_{self.out}"
        bits = [self.div, f"{self.rows}x{self.vocab}", str(self.zs_dtype)[6:],
                str(self.zt_dtype)[6:], out, f"T{self.temperature}"]
        bits += [f"beta{self.beta}"] if self.div == "jsd" else []
        bits += [f"skew{self.skew}"] if self.div.startswith("skew") else []
        bits += [f"alpha{self.alpha}"] if self.div == "alpha" else []
        bits += [f"cap{self.cap_s},{self.cap_t}"] if self.cap_s or self.cap_t else []
        bits += ["ce"] if self.ce else []
        bits += [f"pad{self.pad}"] if self.pad else []
        bits += [f"dead{len(self.dead)}"] if self.dead else []
        bits += ["".join(f"{k}{v}" for k, v in self.override)] if self.override else []
        return "-".join(bits)


def _split(n_split: int, block_v: int) -> tuple[tuple[str, int], ...]:
    return (("n_split", n_split), ("block_v", block_v))


CASES = (
    # every divergence, fp32, in place, one block per row
    [Case(d, dead=(1,)) for d in DIVS]
    # every divergence, bf16, tempered, both softcaps, padded rows, separate bf16 out,
    # several blocks per split and a forced 3-way vocab split
    + [Case(d, rows=3, vocab=3001, zs_dtype=BF16, zt_dtype=BF16, out="bfloat16",
            temperature=0.7, cap_s=30.0, cap_t=5.0, pad=13, dead=(0,),
            override=_split(3, 512), seed=1) for d in DIVS]
    # every divergence, fp16, V smaller than a block, no CE, student softcap only
    + [Case(d, rows=9, vocab=5, zs_dtype=F16, zt_dtype=F16, out="float16", temperature=3.0,
            cap_s=4.0, ce=False, dead=(2, 7), seed=2) for d in DIVS]
    # the CUDA driver's layout: fp32 logits, bf16 dL/dz buffer; a chunk of one row, split
    + [Case("forward_kl", rows=1, vocab=2053, out="bfloat16", override=_split(2, 256)),
       Case("jsd", rows=1, vocab=2053, zt_dtype=BF16, out="bfloat16", temperature=2.0,
            override=_split(4, 128), seed=3)]
    # packed: 16-bit dL/dz written over the fp32 logits, several tiles per row (front to back),
    # padded rows, dead rows; one row per program and several (V smaller than a tile)
    + [Case(d, rows=4, vocab=1037, zt_dtype=BF16, out="packed_bfloat16", temperature=0.7,
            cap_s=30.0, pad=5, dead=(2,), override=(("block_v", 256),), seed=8) for d in DIVS]
    + [Case("jsd", rows=9, vocab=7, out="packed_float16", dead=(0, 5), seed=9),
       Case("forward_kl", rows=3, vocab=4099, out="packed_bfloat16", cap_t=3.0, seed=10)]
    # mixture weights at their ends (log m = log p or log q exactly) and near them
    + [Case("skew_forward_kl", skew=s, temperature=1.5, seed=4) for s in (0.0, 1.0)]
    + [Case("skew_reverse_kl", skew=s, temperature=1.5, seed=5) for s in (0.0, 1.0)]
    + [Case("jsd", beta=b, seed=6) for b in (1e-3, 0.999)]
    + [Case("alpha", alpha=a, temperature=1.5, seed=11) for a in (0.02, 0.98)]
    # labels at the edges of the vocabulary and of the splits, CE at T != 1
    + [Case("reverse_kl", rows=6, vocab=1500, temperature=2.0, labels=(0, 1499, 500, 499, -1,
                                                                         1000),
            override=_split(3, 256), pad=3, seed=7)]
)


def _tensors(case: Case):
    gen = torch.Generator().manual_seed(case.seed)
    c, v = case.rows, case.vocab

    def logits(dtype, scale):
        full = torch.randn(c, v + case.pad, generator=gen) * scale
        return full.to(dtype).to(DEVICE)[:, :v]

    zs, zt = logits(case.zs_dtype, 3.0), logits(case.zt_dtype, 3.0)
    if case.labels is not None:
        labels = torch.tensor(case.labels, dtype=torch.int64)
    else:
        labels = torch.randint(0, v, (c,), generator=gen)
        labels[::3] = -1  # label held by another block / rank
    labels = labels.to(DEVICE) if case.ce else torch.full((c,), -1, device=DEVICE)
    for i, row in enumerate(case.dead):  # ignored tokens may hold anything
        zs[row] = (float("nan"), float("inf"), float("-inf"))[i % 3]
        zt[row, ::2] = float("inf")
    return zs, zt, labels


def _spec(case: Case) -> RowSpec:
    return RowSpec.build(case.div, beta=case.beta, skew=case.skew, alpha=case.alpha,
                         temperature=case.temperature, student_softcap=case.cap_s,
                         teacher_softcap=case.cap_t, has_ce=case.ce)


def _kd_and_aux(spec: RowSpec, stats: torch.Tensor, mix: torch.Tensor | None):
    return row_kd_and_aux(spec.divergence_record, finish(stats), mix, dict(spec.params))


def _assert_columns_close(ours: torch.Tensor, ref: torch.Tensor, what: str,
                          floor: float = 1e-30) -> None:
    assert ours.shape == ref.shape and ours.dtype == torch.float32, what
    for col in range(ref.shape[1]):
        r = ref[:, col].double()
        scale = max(r.abs().max().item(), floor)
        err = (ours[:, col].double() - r).abs().max().item()
        assert err <= STAT_TOL * scale, f"{what} column {col}: {err:.3g} > {STAT_TOL} * {scale:.3g}"


def _coef(spec, stats, mix, case: Case) -> torch.Tensor:
    totals = finish(stats)
    _, aux = _kd_and_aux(spec, stats, mix)
    c = case.rows
    kd = torch.linspace(0.3, 1.1, c, device=DEVICE) / case.temperature
    ce = torch.full((c,), 0.5 if case.ce else 0.0, device=DEVICE)
    dead = list(case.dead)
    kd[dead] = 0.0
    ce[dead] = 0.0
    cols = dict(totals._asdict(), aux=aux, kd=kd, ce=ce)
    return torch.stack([cols[name] for name in COEF], 1)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_row_ops_match_torch_backend(case: Case, monkeypatch):
    for key, value in case.override:
        monkeypatch.setitem(triton_rows.OVERRIDE, key, value)
    spec = _spec(case)
    zs, zt, labels = _tensors(case)
    live = [r for r in range(case.rows) if r not in case.dead]

    ref_stats = torch_rows.stats(zs, zt, labels, spec)
    stats = triton_rows.stats(zs, zt, labels, spec)
    _assert_columns_close(stats[live], ref_stats[live], "stats")

    mix = None
    if spec.needs_mix:
        nrm = norms(finish(ref_stats))
        mix = torch_rows.mix(zs, zt, nrm, spec)
        # Mix sums can be tiny (JSD at beta 1e-3) while each term still carries fp32
        # rounding of log-probs of magnitude <= ~30: judge them on a scale of at least 0.1.
        _assert_columns_close(triton_rows.mix(zs, zt, nrm, spec)[live], mix[live], "mix",
                              floor=0.1)

    coef = _coef(spec, ref_stats, mix, case)
    ref = torch.empty(zs.shape, dtype=zs.dtype if case.out == "alias"
                      else getattr(torch, case.out.removeprefix("packed_")), device=DEVICE)
    torch_rows.grad(zs, zt, labels, coef, spec, ref)
    if case.out == "alias":
        # in place over a copy of zs with the same (padded) row stride
        out = torch.empty(case.rows, case.vocab + case.pad, dtype=zs.dtype,
                          device=DEVICE)[:, :case.vocab]
        out.copy_(zs)
        triton_rows.grad(out, zt, labels, coef, spec, out)
    elif case.out.startswith("packed"):
        work = torch.empty(case.rows, case.vocab + case.pad, dtype=zs.dtype,
                           device=DEVICE)[:, :case.vocab]
        work.copy_(zs)
        out = work.view(ref.dtype)[:, :case.vocab]
        triton_rows.grad(work, zt, labels, coef, spec, out)
        own = torch.full_like(ref, float("nan"))
        triton_rows.grad(zs, zt, labels, coef, spec, own)
        # the same arithmetic as a buffer of its own, bit for bit (dead rows: both zeros)
        assert torch.equal(out, own), "packed dL/dz differs from dL/dz in its own buffer"
    else:
        out = torch.full_like(ref, float("nan"))  # poisoned: every element must be written
        triton_rows.grad(zs, zt, labels, coef, spec, out)
    assert (out[list(case.dead)] == 0).all(), "dead rows must get exact zeros"
    assert torch.isfinite(out[live]).all()
    tol = STAT_TOL if out.dtype == torch.float32 else HALF_GRAD_TOL
    err = rel_err(out[live], ref[live])
    assert err <= tol, f"grad: relative error {err:.3g} > {tol}"


# On a GPU each new specialisation compiles (~1 s): fewer examples keep gpu_check.sh's cap.
@settings(max_examples=10 if HAS_CUDA else 30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 6), vocab=st.integers(1, 700), pad=st.integers(0, 5),
       div=st.sampled_from(DIVS), out_dtype=st.sampled_from([BF16, F16]),
       block_v=st.sampled_from([32, 128, 1024]), temperature=st.sampled_from([0.5, 1.0, 3.0]),
       ce=st.booleans(), cap=st.sampled_from([None, 7.0]), seed=st.integers(0, 2**16))
def test_packed_grad_equals_own_buffer(rows, vocab, pad, div, out_dtype, block_v, temperature,
                                       ce, cap, seed, monkeypatch):
    """Property: dL/dz packed over the fp32 logits is bit-identical to dL/dz written to a
    buffer of its own, for any shape (odd, prime, smaller than a tile, many tiles), padding,
    divergence and option; the first and last rows are dead."""
    monkeypatch.setitem(triton_rows.OVERRIDE, "block_v", block_v)
    dead = (0,) if rows == 1 else (0, rows - 1)
    case = Case(div, rows=rows, vocab=vocab, zt_dtype=BF16, temperature=temperature,
                cap_s=cap, ce=ce, pad=pad, dead=dead, seed=seed)
    spec = _spec(case)
    zs, zt, labels = _tensors(case)
    stats = torch_rows.stats(zs, zt, labels, spec)
    mix = torch_rows.mix(zs, zt, norms(finish(stats)), spec) if spec.needs_mix else None
    coef = _coef(spec, stats, mix, case)
    own = torch.full(zs.shape, float("nan"), dtype=out_dtype, device=DEVICE)
    triton_rows.grad(zs, zt, labels, coef, spec, own)
    work = torch.empty(rows, vocab + pad, device=DEVICE)[:, :vocab]
    work.copy_(zs)
    packed = work.view(out_dtype)[:, :vocab]
    triton_rows.grad(work, zt, labels, coef, spec, packed)
    assert torch.equal(packed, own)
    assert (packed[list(dead)] == 0).all()


@pytest.mark.parametrize("div", ["jsd", "alpha"])
def test_nan_logit_gives_non_finite_stats_only_in_its_row(div):
    case = Case(div, rows=4, vocab=700, temperature=2.0)
    spec = _spec(case)
    zs, zt, labels = _tensors(case)
    zs[1, 123] = float("nan")
    zt[2, 5] = float("nan")
    stats = triton_rows.stats(zs, zt, labels, spec)
    kd, _ = _kd_and_aux(spec, stats, triton_rows.mix(zs, zt, norms(finish(stats)), spec))
    assert not torch.isfinite(kd[1]) and not torch.isfinite(kd[2])
    assert torch.isfinite(kd[[0, 3]]).all()


def test_nan_logit_gives_non_finite_loss():
    zs = torch.randn(6, 300, device=DEVICE)
    zt = torch.randn(6, 300, device=DEVICE)
    zs[4, 17] = float("nan")
    for div in ("forward_kl", "tvd", "alpha"):
        loss = kdkernels.kd_loss(zs, zt, divergence=div, impl="triton")
        assert not torch.isfinite(loss), div


def test_empty_chunk():
    spec = _spec(Case())
    zs = torch.empty(0, 50, device=DEVICE)
    labels = torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert triton_rows.stats(zs, zs, labels, spec).shape == (0, len(STATS))
    empty_norms = torch.empty(0, len(NORMS), device=DEVICE)
    assert triton_rows.mix(zs, zs, empty_norms, spec).shape == (0, len(MIX))
    triton_rows.grad(zs, zs, labels, torch.empty(0, len(COEF), device=DEVICE), spec, zs)


def test_rejects_bad_layout():
    spec = _spec(Case())
    zs = torch.randn(4, 64, device=DEVICE)
    labels = torch.full((4,), -1, device=DEVICE)
    with pytest.raises(ValueError, match="unit column stride"):
        triton_rows.stats(zs.t(), zs.t(), labels, spec)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        triton_rows.stats(zs.double(), zs, labels, spec)
    with pytest.raises(ValueError, match="out must be"):
        triton_rows.grad(zs, zs, labels, torch.zeros(4, len(COEF), device=DEVICE), spec,
                         zs[:, :10])
    coef = torch.zeros(4, len(COEF), device=DEVICE)
    wide = torch.randn(4, 128, device=DEVICE)
    # overlaps that are neither in place nor packed would race: refused, naming both layouts
    for zs_view, out in ((wide[:, :64], wide[:, 64:]),  # shifted, same dtype
                         (wide[:, :64], wide.view(BF16)[:, 2:66])):  # packed but offset
        with pytest.raises(ValueError, match="neither zs itself nor 16-bit"):
            triton_rows.grad(zs_view, zs_view, labels, coef, spec, out)


# ---- alpha against float64 formulas of its own ------------------------------------------

def _alpha_case(alpha: float, temperature: float):
    """fp32 logits with a masked vocabulary (-inf in both, columns 0-4), a column that only
    the student masks (row 1) and one that only the teacher masks (row 2)."""
    gen = torch.Generator().manual_seed(21)
    zs = torch.randn(4, 301, generator=gen) * 3
    zt = torch.randn(4, 301, generator=gen) * 3
    zs[:, :5] = zt[:, :5] = float("-inf")
    zs[1, 40] = float("-inf")
    zt[2, 77] = float("-inf")
    spec = RowSpec.build("alpha", alpha=alpha, temperature=temperature)
    return zs.to(DEVICE), zt.to(DEVICE), torch.full((4,), -1, device=DEVICE), spec


@pytest.mark.parametrize("alpha,temperature", [(0.35, 1.5), (0.9, 1.0)])
def test_alpha_matches_float64_formulas(alpha, temperature):
    """Mix sums and dL/dz of the alpha divergence against float64 autograd of
    (1 - sum q^alpha p^(1-alpha)) / (alpha (1 - alpha)), with -inf logits in the rows."""
    zs, zt, labels, spec = _alpha_case(alpha, temperature)
    stats = triton_rows.stats(zs, zt, labels, spec)
    mix = triton_rows.mix(zs, zt, norms(finish(stats)), spec)
    z64 = zs.cpu().double().requires_grad_()
    logp = torch.log_softmax(z64 / temperature, 1)
    logq = torch.log_softmax(zt.cpu().double() / temperature, 1)
    w = torch.exp(alpha * logq + (1 - alpha) * logp)
    p, q = logp.exp(), logq.exp()
    ref_mix = torch.stack(((p + alpha * (q - p) - w).sum(1), w.sum(1)), 1)
    assert torch.isfinite(mix).all()
    err = (mix.cpu().double() - ref_mix.detach()).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref_mix.abs().max().item()), err
    kd, aux = _kd_and_aux(spec, stats, mix)
    divergence = (1 - w.sum(1)) / (alpha * (1 - alpha))
    assert rel_err(kd.cpu(), divergence.detach()) <= 1e-5
    divergence.sum().backward()
    ones = torch.ones(4, device=DEVICE)
    cols = dict(finish(stats)._asdict(), aux=aux, kd=ones / temperature, ce=0 * ones)
    coef = torch.stack([cols[name] for name in COEF], 1)
    for out_dtype in (F32, BF16):
        out = torch.full(zs.shape, float("nan"), dtype=out_dtype, device=DEVICE)
        triton_rows.grad(zs, zt, labels, coef, spec, out)
        assert torch.isfinite(out).all() and (out[:, :5] == 0).all() and out[1, 40] == 0
        tol = 1e-5 if out_dtype == F32 else HALF_GRAD_TOL
        assert rel_err(out.cpu(), z64.grad) <= tol, out_dtype


def test_alpha_mix_is_exactly_zero_at_equal_logits():
    """c0 = sum p + alpha (q - p) - q^alpha p^(1-alpha) has a zero term wherever q == p, so
    the divergence of a student equal to its teacher is exactly 0 (not 1 - sum w)."""
    zs, _, labels, _ = _alpha_case(0.35, 1.0)
    for spec in (RowSpec.build("alpha", alpha=0.35, temperature=1.3),
                 RowSpec.build("alpha", alpha=0.6, student_softcap=5.0, teacher_softcap=5.0)):
        stats = triton_rows.stats(zs, zs.clone(), labels, spec)
        mix = triton_rows.mix(zs, zs.clone(), norms(finish(stats)), spec)
        assert (mix[:, MIX.c0] == 0).all(), mix
        assert ((mix[:, MIX.c1] - 1).abs() <= 1e-5).all()
        assert (_kd_and_aux(spec, stats, mix)[0] == 0).all()


# ---- kernel constants from the Python tables ----------------------------------------------

def test_kernel_codes_and_columns_come_from_the_tables():
    from kdkernels.triton_kernels import common, row_math

    assert row_math.DIVERGENCE_CODES == {d.name: d.code for d in divergences.TABLE}
    for d in divergences.TABLE:  # every table row has its DIV constexpr, with its code
        assert getattr(row_math, d.name.upper()).value == d.code, d.name
    for prefix, layout in (("S", STATS), ("MIX", MIX), ("NORM", NORMS), ("C", COEF)):
        for name in layout:
            assert getattr(common, f"{prefix}_{name.upper()}").value == getattr(layout, name)
    assert common.N_STATS.value == len(STATS) and common.N_MIX.value == len(MIX)
    for module, prefix, table in ((row_math, "MIX", layouts.MIX_KINDS),
                                  (common, "WEIGHT", layouts.STATS_WEIGHTS)):
        for name in table:
            assert getattr(module, f"{prefix}_{name.upper()}").value == getattr(table, name)


def test_kernels_hold_no_integer_column_index_or_stride():
    """No integer literal in the kernels' arithmetic (a column index, a row stride of a
    layout): each comes from common.py's constexprs, i.e. from layouts.py."""
    from kdkernels.triton_kernels import grad, mix, stats

    for module in (stats, mix, grad):  # row_math.py holds element math, not layouts
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.BinOp):
                for side in (node.left, node.right):
                    literal = isinstance(side, ast.Constant) and type(side.value) is int
                    assert not literal, f"{module.__name__}:{node.lineno}: {ast.unparse(node)}"


@pytest.mark.parametrize("div", DIVS)
def test_kernel_arguments_come_from_the_spec(div):
    """Each kernel takes its row constants from spec.consts by name and its flags from the
    spec; the stats kernel is keyed by the stats weight, not by the divergence."""
    from kdkernels.triton_kernels.grad import grad_kernel
    from kdkernels.triton_kernels.mix import mix_kernel
    from kdkernels.triton_kernels.stats import stats_kernel

    spec = RowSpec.build(div, temperature=2.0, student_softcap=9.0, has_ce=True)
    plain = RowSpec.build(div)
    for kernel in (stats_kernel, mix_kernel, grad_kernel):
        args = triton_rows._spec_args(kernel, spec)
        for name in set(kernel.arg_names) & set(layouts.CONSTS):
            assert args[name] == spec.const(name)
        assert args["TEMPERED"] is True and triton_rows._spec_args(kernel, plain)["TEMPERED"] \
            is False
        assert args["HAS_CAP_S"] is True and args["HAS_CAP_T"] is False
    stats_args = triton_rows._spec_args(stats_kernel, spec)
    assert "DIV" not in stats_args and stats_args["SEPARATE_Z"] is True
    assert stats_args["STATS_WEIGHT"] == getattr(layouts.STATS_WEIGHTS,
                                                 divergences.get(div).stats_weight)
    grad_args = triton_rows._spec_args(grad_kernel, spec)
    assert grad_args["DIV"] == spec.code and grad_args["k_div"] == spec.const("k_div")
    assert grad_args["MIX_KIND"] == spec.const("mix_kind")


# ---- planning (pure Python) ----------------------------------------------------------------

@pytest.mark.parametrize("rows,vocab,elem", [(64, 262144, 4), (64, 262144, 2), (209, 128256, 4),
                                             (1, 32000, 2), (8192, 128256, 4), (7, 10, 4),
                                             (300, 151936, 4)])
def test_gpu_plan_fills_the_device(rows, vocab, elem, monkeypatch):
    monkeypatch.setattr(triton_rows, "_sm_count", lambda index: 132)
    plan = triton_rows._plan(rows, vocab, torch.device("cuda", 0), elem)
    programs = plan.row_blocks(rows) * plan.n_split
    assert plan.span % plan.block_v == 0 and plan.block_v & (plan.block_v - 1) == 0
    assert (plan.n_split - 1) * plan.span < vocab <= plan.n_split * plan.span  # no empty split
    if rows * vocab >= 8 * 132 * 4 * plan.block_v:  # enough work to fill 132 SMs
        assert programs >= 2 * 132, plan
    if rows >= 8 * 132:
        assert plan.n_split == 1  # enough rows: no merge pass
    # >= 16 elements per thread and step (the measured rule for the reduction passes)
    assert plan.block_r * plan.block_v >= 32 * 16 * plan.num_warps or plan.num_warps == 1
    # 16-byte loads: a block holds a whole number of 16-byte vectors
    assert plan.block_v * elem % 16 == 0 or plan.block_v >= vocab


def test_cpu_plan_uses_few_programs():
    plan = triton_rows._plan(12, 1500, torch.device("cpu"), 4)
    assert plan.row_blocks(12) == 1 and plan.n_split == 1 and plan.block_v >= 1500


# ---- the backend's entry in the table -----------------------------------------------------

def test_not_supported_reasons(monkeypatch):
    spec = _spec(Case())
    assert "float64" in " ".join(triton_rows.not_supported_reasons(DEVICE, torch.float64, spec))
    assert triton_rows.not_supported_reasons(torch.device("meta"), F32, spec)
    monkeypatch.setattr(triton_rows, "_INTERPRETED", False)
    why = " ".join(triton_rows.not_supported_reasons(torch.device("cpu"), F32, spec))
    assert "TRITON_INTERPRET=1" in why
    for dtype, size in ((F32, 8), (BF16, 4), (F16, 4)):
        assert triton_rows.workspace_bytes_per_logit(dtype) == size


def test_auto_order_keeps_triton_off_cpu_and_first_on_cuda():
    # H200 measurements (bench/results/h200): triton <= cuda at every vocabulary.
    assert "triton" not in registry.AUTO_ORDER["cpu"]
    assert registry.AUTO_ORDER["cuda"] == ("triton", "cuda", "torch")


# ---- end to end against the float64 oracle ------------------------------------------------

FUSED_CASES = [
    dict(divergence="forward_kl", temperature=2.0, ce_weight=0.5, chunk_size=4),
    dict(divergence="jsd", beta=0.3, student_softcap=30.0, teacher_softcap=5.0,
         reduction="sum"),
    dict(divergence="tvd", temperature=1.5, kd_weight=0.7, chunk_size=5, reduction="none"),
    dict(divergence="skew_reverse_kl", skew=0.2, ce_weight=0.3, num_items=7.0),
    dict(divergence="alpha", alpha=0.3, temperature=2.0, ce_weight=0.4, chunk_size=4),
]


@pytest.mark.parametrize("opts", FUSED_CASES, ids=lambda o: o["divergence"])
def test_fused_linear_matches_oracle(opts):
    from kdkernels.reference import reference_fused_linear_kd_loss

    inp = make_fused(11, 1003, 1001, 16, 24, F32, bias=True, ignore_frac=0.3, seed=3)
    inp = {k: (v.to(DEVICE).detach().requires_grad_(v.requires_grad) if v is not None else v)
           for k, v in inp.items()}
    ours = run_fused(kdkernels.fused_linear_kd_loss, inp, impl="triton", **opts)
    ref = run_fused(reference_fused_linear_kd_loss, inp, **opts)
    for what, a, b in zip(("loss", "grad_h", "grad_w", "grad_bias"), ours, ref, strict=True):
        # fp32 logits from a 16/24-term product, then the fp32 row math: 1e-5 norm-wise.
        assert rel_err(a, b) <= 1e-5, f"{what}: {rel_err(a, b):.3g}"


@pytest.mark.skipif(HAS_CUDA, reason="emulates on CPU what the GPU tests run for real")
@pytest.mark.parametrize("div", ["forward_kl", "jsd", "skew_reverse_kl", "alpha"])
def test_driver_packs_half_grad_over_fp32_logits(div, monkeypatch):
    """The CUDA driver's layout for 16-bit inputs, on CPU: fp32 logits (fp32-output GEMMs
    emulated by upcasting), dL/dz packed by the triton backend over them; the same loss and
    gradients as the torch backend, which gets dL/dz in a buffer of its own."""
    from kdkernels.engine import driver, gemm

    def logits_into(x, w, bias, out):
        torch.mm(x.float(), w.float().t(), out=out)
        return out if bias is None else out.add_(bias)

    monkeypatch.setattr(gemm, "compute_dtype", lambda dtype, device: dtype)
    monkeypatch.setattr(gemm, "logits_dtype", lambda dtype, device: torch.float32)
    monkeypatch.setattr(gemm, "logits_into", logits_into)
    layouts = []
    plan = driver.plan_chunks  # the driver's planner, as the driver imports it
    monkeypatch.setattr(driver, "plan_chunks",
                        lambda **kw: layouts.append(plan(**kw)) or layouts[-1])
    inp = make_fused(37, 211, 211, 16, 24, BF16, ignore_frac=0.2, seed=13)
    opts = dict(divergence=div, temperature=1.5, ce_weight=0.4, skew=0.3, chunk_size=16)
    ours = run_fused(kdkernels.fused_linear_kd_loss, inp, impl="triton", **opts)
    ref = run_fused(kdkernels.fused_linear_kd_loss, inp, impl="torch", **opts)
    assert [p.dz_layout for p in layouts] == ["packed", "own"]
    # same fp32 logits and math; dL/dz rounds to bf16 alike but at near-ties
    assert rel_err(ours[0], ref[0]) <= 1e-5
    for a, b in zip(ours[1:3], ref[1:3], strict=True):
        assert a.dtype == BF16 and rel_err(a, b) <= 2.0**-8


def test_kd_loss_on_strided_half_logits_matches_oracle():
    base = torch.randn(10, 777, device=DEVICE) * 4
    zs = base.to(BF16)[:, :700].requires_grad_()  # a view: row stride 777 > V
    zs = zs.detach().requires_grad_()
    zt = (torch.randn(10, 705, device=DEVICE) * 4).to(F16)
    labels = torch.randint(0, 700, (10,), device=DEVICE)
    labels[3] = -100
    opts = dict(divergence="reverse_kl", temperature=1.3, ce_weight=0.4, chunk_size=3)
    loss = kdkernels.kd_loss(zs, zt, labels, impl="triton", **opts)
    loss.backward()
    z64 = zs.detach().double().requires_grad_()
    ref = reference_kd_loss(z64, zt.double(), labels, **opts)["loss"]
    ref.backward()
    # The loss is fp32 math on the stored bf16/fp16 values: 1e-5. The gradient is rounded
    # once to bf16 (relative 2**-9 per element).
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(zs.grad, z64.grad) <= 2.0**-8


# ---- GPU only: larger shapes against the oracle -----------------------------------------

GPU_DTYPE_CASES = [(d, BF16) for d in DIVS] + [(d, t) for d in ("forward_kl", "jsd")
                                               for t in (F32, F16)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("div,dtype", GPU_DTYPE_CASES, ids=lambda x: str(x))
def test_gpu_fused_linear_matches_oracle(div, dtype):
    from kdkernels.reference import reference_fused_linear_kd_loss

    inp = make_fused(384, 32003, 32011, 64, 96, dtype, ignore_frac=0.1, seed=11)
    inp = {k: (v.cuda().detach().requires_grad_(v.requires_grad) if v is not None else v)
           for k, v in inp.items()}
    opts = dict(divergence=div, temperature=2.0, ce_weight=0.3, beta=0.3, skew=0.2,
                alpha=0.3, chunk_size=100)
    ours = run_fused(kdkernels.fused_linear_kd_loss, inp, impl="triton", **opts)
    ref = run_fused(reference_fused_linear_kd_loss, inp, **opts)
    # fp32: GEMMs in fp32 (TF32 off by default) and ex2.approx exponentials: ~1e-6; 1e-4
    # leaves margin. 16-bit: logits are fp32 GEMM outputs of the same 16-bit inputs as the
    # oracle's, the loss is fp32 math (1e-4); dL/dz is rounded to 16 bits before the
    # gradient GEMMs (2**-9 relative per element, then 16-bit GEMM outputs): 1e-2.
    half = dtype != F32
    for what, a, b in zip(("loss", "grad_h", "grad_w"), ours[:3], ref[:3], strict=True):
        tol = 1e-4 if what == "loss" or not half else 1e-2
        assert rel_err(a, b) <= tol, f"{what}: {rel_err(a, b):.3g} > {tol}"


@gpu
@pytest.mark.gpu
def test_gpu_few_rows_at_large_vocab_use_the_split_and_match():
    from kdkernels.reference import reference_fused_linear_kd_loss

    inp = make_fused(64, 262144, 262144, 32, 32, BF16, seed=12)
    inp = {k: (v.cuda().detach().requires_grad_(v.requires_grad) if v is not None else v)
           for k, v in inp.items()}
    assert triton_rows._plan(64, 262144, torch.device("cuda"), 4).n_split > 1
    opts = dict(divergence="skew_forward_kl", temperature=1.5, chunk_size=64)
    ours = run_fused(kdkernels.fused_linear_kd_loss, inp, impl="triton", **opts)
    ref = run_fused(reference_fused_linear_kd_loss, inp, **opts)
    assert rel_err(ours[0], ref[0]) <= 1e-4
    assert rel_err(ours[1], ref[1]) <= 1e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_gpu_packed_grad_is_race_free_and_matches_oracle(div):
    """Big chunks pack bf16 dL/dz over the fp32 logits (one program per row, a barrier
    per tile): the same as a buffer of its own on a 1024 x 128256 chunk (a race would
    garble whole tiles), and the fused loss through the driver matches the oracle."""
    from kdkernels.reference import reference_fused_linear_kd_loss

    rows, vocab = 1024, 128256
    gen = torch.Generator(device="cuda").manual_seed(14)
    zs = torch.randn(rows, vocab, device="cuda", generator=gen) * 3
    zt = torch.randn(rows, vocab, device="cuda", generator=gen) * 3
    labels = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    spec = _spec(Case(div))
    stats = triton_rows.stats(zs, zt, labels, spec)
    mix = triton_rows.mix(zs, zt, norms(finish(stats)), spec) if spec.needs_mix else None
    coef = _coef(spec, stats, mix, Case(div, rows=rows))
    own = torch.full((rows, vocab), float("nan"), dtype=BF16, device="cuda")
    triton_rows.grad(zs, zt, labels, coef, spec, own)
    packed = zs.view(BF16)[:, :vocab]
    triton_rows.grad(zs, zt, labels, coef, spec, packed)
    # one bf16 ulp for codegen differences; a race would read bf16 bits as fp32 logits
    torch.testing.assert_close(packed, own, rtol=2.0**-7, atol=0.0)

    assert triton_rows.packed_grad_min_rows(torch.device("cuda")) <= 600
    inp = make_fused(600, 32003, 32003, 64, 96, BF16, ignore_frac=0.1, seed=15)
    inp = {k: (v.cuda().detach().requires_grad_(v.requires_grad) if v is not None else v)
           for k, v in inp.items()}
    kw = dict(divergence=div, temperature=2.0, ce_weight=0.3, beta=0.3, chunk_size=600)
    ours = run_fused(kdkernels.fused_linear_kd_loss, inp, impl="triton", **kw)
    ref = run_fused(reference_fused_linear_kd_loss, inp, **kw)
    for what, a, b in zip(("loss", "grad_h", "grad_w"), ours[:3], ref[:3], strict=True):
        tol = 1e-4 if what == "loss" else 1e-2  # as test_gpu_fused_linear_matches_oracle
        assert rel_err(a, b) <= tol, f"{what}: {rel_err(a, b):.3g} > {tol}"


@gpu
@pytest.mark.gpu
def test_gpu_offsets_past_2_31_elements():
    rows, vocab = 8200, 262144  # row 8199 starts at element 2.149e9 > 2**31
    zs = torch.randn(rows, vocab, device="cuda", dtype=BF16)
    zt = torch.randn(rows, vocab, device="cuda", dtype=BF16)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    spec = RowSpec.build("forward_kl", has_ce=True)
    tail = slice(rows - 3, rows)
    stats = triton_rows.stats(zs, zt, labels, spec)
    _assert_columns_close(stats[tail], torch_rows.stats(zs[tail], zt[tail], labels[tail], spec),
                          "stats past 2**31")
    totals = finish(stats)
    ones = torch.ones(rows, device="cuda")
    cols = dict(totals._asdict(), aux=0 * ones, kd=ones, ce=ones)
    coef = torch.stack([cols[name] for name in COEF], 1)
    ref = torch.empty(3, vocab, dtype=BF16, device="cuda")
    torch_rows.grad(zs[tail], zt[tail], labels[tail], coef[tail], spec, ref)
    triton_rows.grad(zs, zt, labels, coef, spec, zs)  # in place
    assert rel_err(zs[tail], ref) <= HALF_GRAD_TOL


# ---- what only compilation checks ----------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="on a GPU every test above compiles the kernels")
def test_kernels_compile_for_hopper_with_16_byte_loads():
    """The interpreter runs the kernels' Python, not Triton's compiler: build PTX for sm_90
    (no GPU needed) and check the main loops load and store 16-byte vectors."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kdkernels.triton_kernels.compile_check"],
                          env=env, capture_output=True, text=True, timeout=300)
    if "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip(f"no ptxas for Triton here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    from kdkernels.triton_kernels.compile_check import CASES as COMPILED

    assert len(lines) == len(COMPILED) and all(line.startswith("ok") for line in lines)
    for line in lines:
        if "BLOCK_R': 1," in line:  # long rows: the 16-byte path
            assert "'ld.global.v4.b32'" in line, line
        if line.startswith("ok   grad") and "BLOCK_R': 1," in line:
            assert "'st.global.v4.b32'" in line, line
        if "'PACKED': True" in line:  # loads of a tile finish before its stores
            assert "'bar': 0" not in line, line


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd", "alpha"])
@pytest.mark.parametrize("scale_s,scale_t,temperature,scap", [
    (0.0625, 3.0, 1.0, None), (3.0, 0.5, 2.0, 20.0)])
def test_logit_scales(div, scale_s, scale_t, temperature, scap):
    """The scales multiply the raw logits where each kernel loads them (the label logit too),
    against the same float64 rows the cpp backend's twin of this test uses."""
    zs = make_logits(5, 1031, BF16, DEVICE, scale=6.0, seed=7)
    zt = make_logits(5, 1031, BF16, DEVICE, scale=6.0, seed=8)
    check_all(_loaded, zs, zt, make_labels(5, 1031, DEVICE),
              spec_of(div, temperature, scap=scap, tcap=4.0, ce=True, scale_s=scale_s,
                      scale_t=scale_t))
