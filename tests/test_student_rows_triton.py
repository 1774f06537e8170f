"""The Triton backend's student-only row ops beyond tests/test_student_rows.py: the vocab-split
grid with several column tiles per split and its merge (forced small tiles, as
tests/test_triton_backend.py forces them), whole splits masked, long rows, the packed layout
(16-bit dL/dz over the fp32 logits, bit-identical to a buffer of its own), dead rows with
garbage logits, empty chunks, and the kernels' constants and compilation.

Oracles and tolerances are those of tests/test_student_rows.py (float64 formulas of
backends/base.py).
"""

from __future__ import annotations

import ast
import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdkernels import layouts
from kdkernels.backends import registry
from kdkernels.backends.base import RowSpec
from kdkernels.layouts import SCOEF, SSTATS

from .test_student_rows import (
    OUT_ULP,
    _check,
    _spec,
    coefficients,
    make_rows,
    oracle_grad,
    oracle_stats,
)

_loaded = registry.load("triton")
if isinstance(_loaded, str):
    pytest.skip(_loaded, allow_module_level=True)
from kdkernels.backends import triton_rows  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
_why = triton_rows.not_supported_reasons(DEVICE, torch.float32, RowSpec.build("forward_kl"))
if _why:
    pytest.skip("; ".join(_why), allow_module_level=True)

# The interpreter evaluates lanes that the kernels then discard (a row with no unmasked
# column has m = -inf) through numpy, which warns.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _override(monkeypatch, **values: int) -> None:
    for key, value in values.items():
        monkeypatch.setitem(triton_rows.OVERRIDE, key, value)


def _on_device(*xs: torch.Tensor):
    return [x.to(DEVICE) for x in xs]


def run_case(rows, cols, dtype, temperature, cap, ce, mask_frac, seed, out_dtype=F32,
             stride_pad=0):
    """tests/test_student_rows.run_case on DEVICE (compiled kernels on a GPU): stats and a
    poisoned dL/dz against the float64 formulas; row 0 dead, row 1 masked everywhere."""
    spec = _spec(temperature, cap, ce)
    zs, labels, mask = make_rows(rows, cols, dtype, mask_frac=mask_frac, seed=seed,
                                 stride_pad=stride_pad, all_masked_row=True)
    stats = triton_rows.student_stats(zs.to(DEVICE), spec).cpu()
    _check("stats", stats, oracle_stats(zs, spec), 2e-5, 0.0)
    coef = coefficients(stats, spec, seed + 1)
    out = torch.full((rows, cols), math.nan, dtype=out_dtype, device=DEVICE)
    triton_rows.student_grad(zs.to(DEVICE), labels.to(DEVICE), coef.to(DEVICE), spec, out)
    out = out.cpu()
    assert (out[0] == 0).all() and (out[mask] == 0).all()
    _check("grad", out, oracle_grad(zs, labels, coef, spec), 1e-5 + OUT_ULP[out_dtype], 1e-7)


# ---- the vocab split: several programs per row, several tiles per program, merged --------

SPLIT_CASES = [  # (rows, cols, dtype, temperature, cap, ce, mask_frac, n_split, block_v)
    (5, 1500, F32, 2.5, None, True, 0.3, 3, 128),
    (3, 2053, BF16, 0.7, 5.0, True, 0.1, 4, 64),
    (7, 999, F16, 1.0, 5.0, False, 0.6, 2, 256),
    (4, 777, F32, 1.0, None, True, 0.0, 5, 32),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_vocab_split_matches_float64(case, monkeypatch):
    rows, cols, dtype, temperature, cap, ce, mask_frac, n_split, block_v = case
    _override(monkeypatch, n_split=n_split, block_v=block_v, block_r=2)
    plan = triton_rows._plan(rows, cols, DEVICE, dtype.itemsize)
    assert plan.n_split == n_split and plan.span > block_v and plan.row_blocks(rows) > 1
    run_case(rows, cols, dtype, temperature, cap, ce, mask_frac, 11, F32, 3)


def test_split_with_every_column_masked_merges_to_minus_inf_and_zero(monkeypatch):
    """Whole splits masked (a partial of (-inf, 0) to merge), and a row masked everywhere:
    the merge must give the other splits' stats, resp. (-inf, 0), without NaN."""
    _override(monkeypatch, n_split=4, block_v=64)
    spec = _spec(2.0, 5.0, True)
    zs, labels, _ = make_rows(4, 1024, F32, mask_frac=0.2, seed=5, all_masked_row=True)
    zs[:, 256:512] = -math.inf
    zs[2, :768] = -math.inf  # row 2: only the last split holds columns
    hit_masked = torch.isneginf(zs.gather(1, labels.clamp(min=0)[:, None]))[:, 0]
    labels = torch.where(hit_masked, -1, labels)  # a label column is never masked
    zs, labels = _on_device(zs, labels)
    stats = triton_rows.student_stats(zs, spec)
    _check("split stats", stats.cpu(), oracle_stats(zs.cpu(), spec), 2e-5, 0.0)
    empty = stats[1].tolist()  # row 1 is masked everywhere
    assert [empty[SSTATS.m_a], empty[SSTATS.s_a], empty[SSTATS.m_z], empty[SSTATS.s_z]] == \
        [-math.inf, 0.0, -math.inf, 0.0], empty
    coef = coefficients(stats.cpu(), spec, 6).to(DEVICE)
    out = torch.full(zs.shape, math.nan, device=DEVICE)
    triton_rows.student_grad(zs, labels, coef, spec, out)
    _check("split grad", out.cpu(), oracle_grad(zs.cpu(), labels.cpu(), coef.cpu(), spec),
           1e-5 + OUT_ULP[F32], 1e-7)
    assert (out[torch.isneginf(zs)] == 0).all()


def test_long_rows_default_plan():
    """Rows longer than a CPU tile (several BLOCK_V steps per program) with the default plan."""
    cols = 3 * triton_rows._CPU_BLOCK_V + 123
    run_case(2, cols, BF16, 1.5, 30.0, True, 0.05, 21, F32)


# ---- the packed layout ----------------------------------------------------------------------

def _packed_and_own(zs, labels, coef, spec, out_dtype, pad):
    rows, cols = zs.shape
    own = torch.full(zs.shape, math.nan, dtype=out_dtype, device=DEVICE)
    triton_rows.student_grad(zs, labels, coef, spec, own)
    work = torch.empty(rows, cols + pad, device=DEVICE)[:, :cols]
    work.copy_(zs)
    packed = work.view(out_dtype)[:, :cols]
    assert triton_rows._packed(work, packed)
    triton_rows.student_grad(work, labels, coef, spec, packed)
    return packed, own


@pytest.mark.parametrize("rows,cols,block_v,out_dtype", [
    (4, 1037, 128, BF16),  # one row per program, several tiles per row, front to back
    (9, 7, None, F16),  # V smaller than a tile: several rows per program
    (3, 4099, None, BF16),
])
def test_packed_grad_matches_float64(rows, cols, block_v, out_dtype, monkeypatch):
    if block_v is not None:
        _override(monkeypatch, block_v=block_v)
    spec = _spec(0.7, 30.0, True)
    zs, labels, mask = make_rows(rows, cols, F32, mask_frac=0.2, seed=8, stride_pad=5,
                                 all_masked_row=True)
    zs, labels = _on_device(zs, labels)
    coef = coefficients(triton_rows.student_stats(zs, spec).cpu(), spec, 9).to(DEVICE)
    packed, own = _packed_and_own(zs, labels, coef, spec, out_dtype, pad=5)
    assert torch.equal(packed, own), "packed dL/dz differs from dL/dz in its own buffer"
    assert (packed[0] == 0).all() and (packed[mask.to(DEVICE)] == 0).all()
    _check("packed grad", packed.cpu(), oracle_grad(zs.cpu(), labels.cpu(), coef.cpu(), spec),
           1e-5 + OUT_ULP[out_dtype], 1e-7)


# On a GPU each new specialisation compiles (~1 s): fewer examples keep gpu_check.sh's cap.
@settings(max_examples=6 if HAS_CUDA else 20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 6), cols=st.integers(1, 700), pad=st.integers(0, 5),
       out_dtype=st.sampled_from([BF16, F16]), block_v=st.sampled_from([32, 128, 1024]),
       temperature=st.sampled_from([0.5, 1.0, 3.0]), ce=st.booleans(),
       cap=st.sampled_from([None, 7.0]), mask_frac=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 2**16))
def test_packed_grad_equals_own_buffer(rows, cols, pad, out_dtype, block_v, temperature, ce,
                                       cap, mask_frac, seed, monkeypatch):
    """Property: packed over the fp32 logits is bit-identical to a buffer of its own, for any
    shape, padding, tile and option; dead rows hold garbage and get zeros."""
    _override(monkeypatch, block_v=block_v)
    spec = _spec(temperature, cap, ce)
    zs, labels, _ = make_rows(rows, cols, F32, mask_frac=mask_frac, seed=seed)
    coef = coefficients(triton_rows.student_stats(zs.to(DEVICE), spec).cpu(), spec, seed)
    zs[0] = math.nan  # row 0 is dead (kd = ce = 0): its logits are never read
    if rows > 2:
        zs[-1] = math.inf
        coef[-1, SCOEF.kd] = coef[-1, SCOEF.ce] = 0.0
    zs, labels, coef = _on_device(zs, labels, coef)
    packed, own = _packed_and_own(zs, labels, coef, spec, out_dtype, pad)
    assert torch.equal(packed, own)
    assert (packed[0] == 0).all() and torch.isfinite(packed).all()


# ---- rows, shapes and layouts -----------------------------------------------------------

@pytest.mark.parametrize("out_dtype", [F32, BF16])
def test_dead_rows_with_garbage_get_exact_zeros(out_dtype):
    spec = _spec(2.0, 5.0, True)
    zs, labels, _ = make_rows(6, 300, F32, mask_frac=0.1, seed=2)
    coef = coefficients(triton_rows.student_stats(zs.to(DEVICE), spec).cpu(), spec, 3)
    for row, junk in ((2, math.nan), (4, math.inf)):
        zs[row] = junk
        coef[row, SCOEF.kd] = coef[row, SCOEF.ce] = 0.0
        coef[row, SCOEF.log_s_a] = coef[row, SCOEF.m_z] = math.inf  # never evaluated
    zs, labels, coef = _on_device(zs, labels, coef)
    out = torch.full(zs.shape, math.nan, dtype=out_dtype, device=DEVICE)
    triton_rows.student_grad(zs, labels, coef, spec, out)
    assert (out[[0, 2, 4]] == 0).all() and torch.isfinite(out).all()


def test_zero_kd_with_infinite_normaliser_is_not_nan():
    """kd == 0 with ce != 0 (CE only): the a-normaliser may be infinite, its term is skipped."""
    spec = _spec(2.0, None, True)
    zs, labels, _ = make_rows(5, 200, F32, mask_frac=0.1, seed=4)
    coef = coefficients(triton_rows.student_stats(zs.to(DEVICE), spec).cpu(), spec, 5)
    coef[:, SCOEF.kd] = 0.0
    coef[:, SCOEF.log_s_a] = math.inf
    coef[:, SCOEF.m_a] = -math.inf
    coef[0, SCOEF.ce] = 0.5
    zs, labels, coef = _on_device(zs, labels, coef)
    out = torch.full(zs.shape, math.nan, device=DEVICE)
    triton_rows.student_grad(zs, labels, coef, spec, out)
    assert torch.isfinite(out).all()
    ref = oracle_grad(zs.cpu(), labels.cpu(), coef.cpu(), spec)
    _check("ce-only grad", out.cpu(), ref, 1e-5 + OUT_ULP[F32], 1e-7)


def test_empty_chunks():
    spec = _spec(2.0, None, True)
    coef = torch.zeros(0, len(SCOEF), device=DEVICE)
    zs = torch.empty(0, 50, device=DEVICE)
    labels = torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert triton_rows.student_stats(zs, spec).shape == (0, len(SSTATS))
    triton_rows.student_grad(zs, labels, coef, spec, zs)
    none = torch.empty(3, 0, device=DEVICE)
    stats = triton_rows.student_stats(none, spec)
    for m, s in ((SSTATS.m_a, SSTATS.s_a), (SSTATS.m_z, SSTATS.s_z)):  # no column: (-inf, 0)
        assert (stats[:, m] == -math.inf).all() and (stats[:, s] == 0).all()
    triton_rows.student_grad(none, torch.full((3,), -1, device=DEVICE),
                             torch.zeros(3, len(SCOEF), device=DEVICE), spec, none)


def test_rejects_bad_layout():
    spec = _spec(1.0, None, False)
    zs = torch.randn(4, 64, device=DEVICE)
    labels = torch.full((4,), -1, device=DEVICE)
    coef = torch.zeros(4, len(SCOEF), device=DEVICE)
    with pytest.raises(ValueError, match="unit column stride"):
        triton_rows.student_stats(zs.t(), spec)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        triton_rows.student_stats(zs.double(), spec)
    with pytest.raises(ValueError, match="out must be"):
        triton_rows.student_grad(zs, labels, coef, spec, zs[:, :10])
    wide = torch.randn(4, 128, device=DEVICE)
    with pytest.raises(ValueError, match="neither zs itself nor 16-bit"):
        triton_rows.student_grad(wide[:, :64], labels, coef, spec, wide[:, 64:])


# ---- kernel constants from the Python tables, arguments from the spec -------------------------

def test_student_kernel_columns_come_from_the_layouts():
    from kdkernels.triton_kernels import student

    for prefix, layout in (("SS", SSTATS), ("SC", SCOEF)):
        for name in layout:
            assert getattr(student, f"{prefix}_{name.upper()}").value == getattr(layout, name)
    assert student.N_SSTATS.value == len(SSTATS)


def test_student_kernels_hold_no_integer_column_index_or_stride():
    """As test_triton_backend.test_kernels_hold_no_integer_column_index_or_stride, for
    student.py: every column index and layout stride comes from layouts.py."""
    from kdkernels.triton_kernels import student

    for node in ast.walk(ast.parse(inspect.getsource(student))):
        if isinstance(node, ast.BinOp):
            for side in (node.left, node.right):
                literal = isinstance(side, ast.Constant) and type(side.value) is int
                assert not literal, f"{student.__name__}:{node.lineno}: {ast.unparse(node)}"


def test_student_kernel_arguments_come_from_the_spec():
    from kdkernels.triton_kernels.student import student_grad_kernel, student_stats_kernel

    spec = RowSpec.build("forward_kl", temperature=2.0, student_softcap=9.0, has_ce=True)
    plain = RowSpec.build("forward_kl")
    for kernel in (student_stats_kernel, student_grad_kernel):
        args = triton_rows._spec_args(kernel, spec)
        for name in set(kernel.arg_names) & set(layouts.CONSTS):
            assert args[name] == spec.const(name)
        assert args["TEMPERED"] is True and args["HAS_CAP_S"] is True
        assert args["SEPARATE_Z"] is True
        plain_args = triton_rows._spec_args(kernel, plain)
        assert plain_args["TEMPERED"] is False and plain_args["SEPARATE_Z"] is False
        assert "DIV" not in args  # one compiled variant for every divergence
    assert triton_rows._spec_args(student_grad_kernel, spec)["HAS_CE"] is True


def test_backend_entry_has_the_student_ops():
    backend = registry.load("triton")
    assert backend.student_stats is triton_rows.student_stats
    assert backend.student_grad is triton_rows.student_grad


# ---- GPU only: shapes the interpreter cannot afford ---------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _gpu_rows(rows, cols, dtype, seed, mask_frac=0.05):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    zs = (torch.randn(rows, cols, device="cuda", generator=gen) * 4).to(dtype)
    zs[torch.rand(rows, cols, device="cuda", generator=gen) < mask_frac] = -math.inf
    zs[1] = -math.inf
    labels = torch.randint(0, cols, (rows,), device="cuda", generator=gen)
    labels[::3] = -1
    hit_masked = torch.isneginf(zs.gather(1, labels.clamp(min=0)[:, None]))[:, 0]
    return zs, torch.where(hit_masked, -1, labels)


@gpu
@pytest.mark.gpu
def test_gpu_few_rows_at_large_vocab_use_the_split_and_match():
    rows, cols = 64, 262144
    assert triton_rows._plan(rows, cols, torch.device("cuda"), 2).n_split > 1
    spec = _spec(1.5, 30.0, True)
    zs, labels = _gpu_rows(rows, cols, BF16, 31)
    stats = triton_rows.student_stats(zs, spec)
    _check("stats", stats, oracle_stats(zs, spec), 2e-5, 0.0)
    coef = coefficients(stats.cpu(), spec, 32).cuda()
    out = torch.full(zs.shape, math.nan, dtype=BF16, device="cuda")
    triton_rows.student_grad(zs, labels, coef, spec, out)
    _check("grad", out, oracle_grad(zs, labels, coef, spec), 1e-5 + OUT_ULP[BF16], 1e-7)


@gpu
@pytest.mark.gpu
def test_gpu_packed_grad_is_race_free():
    """One program per row and a barrier per tile: bit-identical to a buffer of its own on a
    1024 x 128256 chunk (a race would read bf16 bits as fp32 logits and garble tiles)."""
    rows, cols = 1024, 128256
    spec = _spec(2.0, None, True)
    zs, labels = _gpu_rows(rows, cols, F32, 33)
    coef = coefficients(triton_rows.student_stats(zs, spec).cpu(), spec, 34).cuda()
    own = torch.full(zs.shape, math.nan, dtype=BF16, device="cuda")
    triton_rows.student_grad(zs, labels, coef, spec, own)
    packed = zs.view(BF16)[:, :cols]
    triton_rows.student_grad(zs, labels, coef, spec, packed)
    torch.testing.assert_close(packed, own, rtol=2.0**-7, atol=0.0)


@gpu
@pytest.mark.gpu
def test_gpu_offsets_past_2_31_elements():
    rows, cols = 8200, 262144  # row 8199 starts at element 2.149e9 > 2**31
    spec = _spec(1.0, None, True)
    zs, labels = _gpu_rows(rows, cols, BF16, 35, mask_frac=0.0)
    tail = slice(rows - 3, rows)
    stats = triton_rows.student_stats(zs, spec)
    _check("stats past 2**31", stats[tail], oracle_stats(zs[tail], spec), 2e-5, 0.0)
    coef = coefficients(stats.cpu(), spec, 36).cuda()
    ref = oracle_grad(zs[tail], labels[tail], coef[tail], spec)
    triton_rows.student_grad(zs, labels, coef, spec, zs)  # in place
    _check("grad past 2**31", zs[tail], ref, 1e-5 + OUT_ULP[BF16], 1e-7)


# ---- what only compilation checks ----------------------------------------------------------

_COMPILE_SCRIPT = """
from kdkernels.triton_kernels import compile_check as cc, student
kernels = cc._kernels()
kernels.update(student_stats=student.student_stats_kernel,
               student_merge=student.student_merge_kernel,
               student_grad=student.student_grad_kernel)
cc._kernels = lambda: kernels
cc._PTRS.update(student_stats=("zs_ptr", "part_ptr"), student_merge=("part_ptr", "out_ptr"),
                student_grad=("zs_ptr", "labels_ptr", "coef_ptr", "out_ptr"))
flags = dict(HAS_CAP_S=False, TEMPERED=False, SEPARATE_Z=False)
on = dict(HAS_CAP_S=True, TEMPERED=True, SEPARATE_Z=True)
cases = [
    ("student_stats", ("fp32", "fp32"), dict(BLOCK_R=1, BLOCK_V=2048, WANT_ENTROPY=True,
                                             **flags)),
    ("student_stats", ("bf16", "fp32"), dict(BLOCK_R=1, BLOCK_V=4096, WANT_ENTROPY=False,
                                             **on)),
    ("student_stats", ("fp16", "fp32"), dict(BLOCK_R=8, BLOCK_V=256, WANT_ENTROPY=True, **on)),
    ("student_merge", ("fp32", "fp32"), dict(BLOCK_R=128, BLOCK_P=8, WANT_ENTROPY=True)),
    ("student_grad", ("fp32", "i64", "fp32", "bf16"),
     dict(HAS_CE=True, BLOCK_R=1, BLOCK_V=2048, ROUND_BF16=False, PACKED=False, **flags)),
    ("student_grad", ("bf16", "i64", "fp32", "bf16"),
     dict(HAS_CE=True, BLOCK_R=1, BLOCK_V=4096, ROUND_BF16=False, PACKED=False, **on)),
    ("student_grad", ("fp32", "i64", "fp32", "fp32"),
     dict(HAS_CE=False, BLOCK_R=4, BLOCK_V=512, ROUND_BF16=False, PACKED=False, **on)),
    ("student_grad", ("fp32", "i64", "fp32", "bf16"),
     dict(HAS_CE=True, BLOCK_R=1, BLOCK_V=2048, ROUND_BF16=False, PACKED=True, **on)),
]
for name, ptrs, consts in cases:
    compiled = cc.compile_case(name, ptrs, consts, 90)
    print("ok", name, consts, cc.memory_ops(compiled.asm["ptx"]))
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU every test above compiles the kernels")
def test_student_kernels_compile_for_hopper_with_16_byte_loads():
    """The interpreter runs the kernels' Python, not Triton's compiler: build PTX for sm_90
    (no GPU needed) through compile_check, and check the long-row loops move 16-byte
    vectors and the packed variant waits for its loads before its stores."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    if "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip(f"no ptxas for Triton here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 8 and all(line.startswith("ok") for line in lines)
    for line in lines:
        if "BLOCK_R': 1," in line and "student_merge" not in line:
            assert "'ld.global.v4.b32'" in line, line
        if line.startswith("ok student_grad") and "BLOCK_R': 1," in line:
            assert "'st.global.v4.b32'" in line, line
        if "'PACKED': True" in line:
            assert "'bar': 0" not in line, line
