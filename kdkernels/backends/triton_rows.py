"""The `triton` backend: the row-op contract as Triton kernels (kdkernels/triton_kernels).

Passes over a [C, V] chunk: stats (one read of zs and zt), mix (one more read, divergences
with needs_mix only), grad (one read of each, one write of dL/dzs). All math in fp32 whatever the
storage; no [C, V] temporaries. The student-only ops of the sparse-teacher losses
(student_stats, student_grad: triton_kernels/student.py) run on the same grids. Rows are
split over several programs along the vocabulary when the chunk has too few rows to fill the
GPU (see _plan).

On CPU tensors the kernels run through Triton's interpreter, only when TRITON_INTERPRET=1
was set before triton was imported (tests/conftest.py does it).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

try:
    import triton
except ImportError as err:  # registry.load turns this into "not available: <reason>"
    raise ImportError(f"the triton backend needs the triton package ({err})") from err

from ..layouts import CONSTS, MIX, SSTATS, STATS
from ..triton_kernels.grad import grad_kernel
from ..triton_kernels.mix import mix_kernel
from ..triton_kernels.stats import merge_kernel, stats_kernel
from ..triton_kernels.student import (
    student_grad_kernel,
    student_merge_kernel,
    student_stats_kernel,
)
from .base import Backend, RowSpec

# @triton.jit reads TRITON_INTERPRET when the kernels are defined, i.e. at this import.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tile/split overrides for tests (force the vocab split on CPU) and for bench sweeps:
# keys block_r, block_v, n_split, num_warps, programs_per_sm. Empty in normal use.
OVERRIDE: dict[str, int] = {}

# GPU heuristics. Long rows: one row per program, BLOCK_V columns per step, and warps for
# _ELEMS_PER_THREAD elements per thread (8 warps at 4096 16-bit logits, 4 at 2048 fp32).
_GPU_BLOCK_V = {2: 4096, 4: 2048}
_GPU_TILE = 2048  # small V: pack rows until a tile has this many elements
_PROGRAMS_PER_SM = 8  # enough resident programs to hide load latency in the stats loop
_MIN_BLOCKS_PER_SPLIT = 4  # a vocab split walks at least this many blocks
_MERGE_TILE = 1024  # partials per merge program (len(STATS) loads each: few registers)
# Elements each thread loads per step and tensor: a reduction loop needs that many loads in
# flight to approach copy bandwidth (8 per thread fell well short on an H200; bench/
# README.md has the figures).
_ELEMS_PER_THREAD = 16
# Interpreter: each program instance costs milliseconds of Python, so use big tiles.
_CPU_BLOCK_V = 8192
_CPU_TILE = 32768


@dataclass(frozen=True)
class _Plan:
    block_r: int
    block_v: int
    n_split: int  # vocab splits of the stats and mix passes
    span: int  # columns per split, a multiple of block_v
    num_warps: int

    def row_blocks(self, n_rows: int) -> int:
        return triton.cdiv(n_rows, self.block_r)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _plan(n_rows: int, n_cols: int, device: torch.device, elem_bytes: int) -> _Plan:
    pow2_v = triton.next_power_of_2(n_cols)
    if device.type == "cuda":
        block_v = min(pow2_v, _GPU_BLOCK_V.get(elem_bytes, 2048))
        block_r = min(triton.next_power_of_2(n_rows), max(1, _GPU_TILE // block_v))
        row_blocks = triton.cdiv(n_rows, block_r)
        # Few rows (a small chunk at a large vocabulary): split each row's vocabulary so
        # that about _PROGRAMS_PER_SM programs per SM run; a row walks >= a few blocks.
        index = torch.cuda.current_device() if device.index is None else device.index
        target = OVERRIDE.get("programs_per_sm", _PROGRAMS_PER_SM) * _sm_count(index)
        n_split = min(triton.cdiv(target, row_blocks),
                      max(1, n_cols // (_MIN_BLOCKS_PER_SPLIT * block_v)))
        num_warps = _warps(block_r * block_v)
    else:
        block_v = min(pow2_v, _CPU_BLOCK_V)
        block_r = min(triton.next_power_of_2(n_rows), max(1, _CPU_TILE // block_v))
        n_split, num_warps = 1, 4
    block_r = OVERRIDE.get("block_r", block_r)
    block_v = OVERRIDE.get("block_v", block_v)
    n_split = max(1, OVERRIDE.get("n_split", n_split))
    num_warps = OVERRIDE.get("num_warps", num_warps)
    span = triton.cdiv(triton.cdiv(n_cols, n_split), block_v) * block_v
    return _Plan(block_r, block_v, triton.cdiv(n_cols, span), span, num_warps)


def _warps(tile_elems: int) -> int:
    return max(1, min(16, tile_elems // (32 * _ELEMS_PER_THREAD)))


def _check(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"triton backend: {name} must be float32/bfloat16/float16, got {x.dtype}")
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"triton backend: {name} must be 2-d with unit column stride, got "
                         f"shape {tuple(x.shape)} strides {x.stride()}")


# The constexpr flags a RowSpec sets, by kernel argument name: each kernel takes those of
# its arguments, so one compiled variant serves every spec with the same flags.
SPEC_FLAGS = {
    "DIV": lambda spec: spec.code,
    "HAS_CE": lambda spec: spec.has_ce,
    "HAS_CAP_S": lambda spec: spec.const("cap_s") > 0,
    "HAS_CAP_T": lambda spec: spec.const("cap_t") > 0,
    "TEMPERED": lambda spec: spec.tempered,
    "SEPARATE_Z": lambda spec: spec.ce_separate,
    "MIX_KIND": lambda spec: int(spec.const("mix_kind")),
    "STATS_WEIGHT": lambda spec: int(spec.const("stats_weight")),
    "WANT_ENTROPY": lambda spec: spec.want_entropy,
}


def _spec_args(kernel, spec: RowSpec) -> dict:
    """The arguments of ``kernel`` that come from ``spec``: the row constants of
    spec.consts it takes as runtime scalars (named as in layouts.CONSTS) and its SPEC_FLAGS."""
    names = kernel.arg_names
    args = {name: spec.const(name) for name in names if name in CONSTS}
    args.update({name: SPEC_FLAGS[name](spec) for name in names if name in SPEC_FLAGS})
    return args


def stats(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, spec: RowSpec
          ) -> torch.Tensor:
    _check("zs", zs)
    _check("zt", zt)
    n_rows, n_cols = zs.shape
    out = torch.empty(n_rows, len(STATS), dtype=torch.float32, device=zs.device)
    if n_rows == 0:
        return out
    plan = _plan(n_rows, n_cols, zs.device, max(zs.element_size(), zt.element_size()))
    part = out if plan.n_split == 1 else torch.empty(
        plan.n_split, n_rows, len(STATS), dtype=torch.float32, device=zs.device)
    stats_kernel[(plan.row_blocks(n_rows), plan.n_split)](
        zs, zt, labels, part, n_rows, n_cols, zs.stride(0), zt.stride(0), plan.span,
        **_spec_args(stats_kernel, spec), BLOCK_R=plan.block_r, BLOCK_V=plan.block_v,
        num_warps=plan.num_warps)
    if plan.n_split > 1:
        block_p = triton.next_power_of_2(plan.n_split)
        block_r = max(1, min(triton.next_power_of_2(n_rows), _MERGE_TILE // block_p))
        merge_kernel[(triton.cdiv(n_rows, block_r),)](
            part, out, n_rows, plan.n_split, **_spec_args(merge_kernel, spec),
            BLOCK_R=block_r, BLOCK_P=block_p, num_warps=4)
    return out


def mix(zs: torch.Tensor, zt: torch.Tensor, norms: torch.Tensor, spec: RowSpec
        ) -> torch.Tensor:
    _check("zs", zs)
    _check("zt", zt)
    n_rows, n_cols = zs.shape
    norms = norms.to(torch.float32).contiguous()
    if n_rows == 0:
        return torch.zeros(0, len(MIX), dtype=torch.float32, device=zs.device)
    plan = _plan(n_rows, n_cols, zs.device, max(zs.element_size(), zt.element_size()))
    part = torch.empty(plan.n_split, n_rows, len(MIX), dtype=torch.float32, device=zs.device)
    mix_kernel[(plan.row_blocks(n_rows), plan.n_split)](
        zs, zt, norms, part, n_rows, n_cols, zs.stride(0), zt.stride(0), norms.stride(0),
        plan.span, **_spec_args(mix_kernel, spec), BLOCK_R=plan.block_r,
        BLOCK_V=plan.block_v, num_warps=plan.num_warps)
    return part[0] if plan.n_split == 1 else part.sum(0)


def grad(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor,
         spec: RowSpec, out: torch.Tensor) -> None:
    _check("zs", zs)
    _check("zt", zt)
    _check("out", out)
    n_rows, n_cols = zs.shape
    if tuple(out.shape) != (n_rows, n_cols):
        raise ValueError(f"triton backend: out must be {[n_rows, n_cols]}, got {list(out.shape)}")
    if n_rows == 0:
        return
    packed = _packed(zs, out)
    coef = coef.to(torch.float32).contiguous()
    plan = _plan(n_rows, n_cols, zs.device, max(zs.element_size(), zt.element_size()))
    grid = (plan.row_blocks(n_rows), 1 if packed else triton.cdiv(n_cols, plan.block_v))
    grad_kernel[grid](
        zs, zt, labels, coef, out, n_rows, n_cols, zs.stride(0), zt.stride(0), out.stride(0),
        coef.stride(0), **_spec_args(grad_kernel, spec), BLOCK_R=plan.block_r,
        BLOCK_V=plan.block_v, ROUND_BF16=_INTERPRETED and out.dtype == torch.bfloat16,
        PACKED=packed, num_warps=plan.num_warps)


def student_stats(zs: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    """(m_a, s_a, m_z, s_z, e_a) of the student alone over its unmasked (not -inf) columns
    (backends/base.py), on the stats pass's grid and merge."""
    _check("zs", zs)
    n_rows, n_cols = zs.shape
    out = torch.empty(n_rows, len(SSTATS), dtype=torch.float32, device=zs.device)
    if n_rows == 0:
        return out
    if n_cols == 0:  # no unmasked column: m = -inf, s = 0 (and e_a = 0)
        for m, s in ((SSTATS.m_a, SSTATS.s_a), (SSTATS.m_z, SSTATS.s_z)):
            out[:, m], out[:, s] = float("-inf"), 0.0
        out[:, SSTATS.e_a] = 0.0
        return out
    plan = _plan(n_rows, n_cols, zs.device, zs.element_size())
    part = out if plan.n_split == 1 else torch.empty(
        plan.n_split, n_rows, len(SSTATS), dtype=torch.float32, device=zs.device)
    student_stats_kernel[(plan.row_blocks(n_rows), plan.n_split)](
        zs, part, n_rows, n_cols, zs.stride(0), plan.span,
        **_spec_args(student_stats_kernel, spec), BLOCK_R=plan.block_r,
        BLOCK_V=plan.block_v, num_warps=plan.num_warps)
    if plan.n_split > 1:
        block_p = triton.next_power_of_2(plan.n_split)
        block_r = max(1, min(triton.next_power_of_2(n_rows), _MERGE_TILE // block_p))
        student_merge_kernel[(triton.cdiv(n_rows, block_r),)](
            part, out, n_rows, plan.n_split, **_spec_args(student_merge_kernel, spec),
            BLOCK_R=block_r, BLOCK_P=block_p, num_warps=4)
    return out


def student_grad(zs: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, spec: RowSpec,
                 out: torch.Tensor) -> None:
    """dL/dzs of the student-only losses (backends/base.py) into ``out``: a buffer of its
    own, zs itself, or 16-bit values packed over the fp32 zs rows, as for grad()."""
    _check("zs", zs)
    _check("out", out)
    n_rows, n_cols = zs.shape
    if tuple(out.shape) != (n_rows, n_cols):
        raise ValueError(f"triton backend: out must be {[n_rows, n_cols]}, got {list(out.shape)}")
    if n_rows == 0 or n_cols == 0:
        return
    packed = _packed(zs, out)
    coef = coef.to(torch.float32).contiguous()
    plan = _plan(n_rows, n_cols, zs.device, zs.element_size())
    grid = (plan.row_blocks(n_rows), 1 if packed else triton.cdiv(n_cols, plan.block_v))
    student_grad_kernel[grid](
        zs, labels, coef, out, n_rows, n_cols, zs.stride(0), out.stride(0), coef.stride(0),
        **_spec_args(student_grad_kernel, spec), BLOCK_R=plan.block_r,
        BLOCK_V=plan.block_v, ROUND_BF16=_INTERPRETED and out.dtype == torch.bfloat16,
        PACKED=packed, num_warps=plan.num_warps)


def _packed(zs: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``out`` packs 16-bit values over the first half of each fp32 ``zs`` row (the
    only cross-dtype aliasing the kernel handles); False when it is its own buffer or zs
    itself. Any other overlap is refused: it would be a silent data race."""
    if out.untyped_storage().data_ptr() != zs.untyped_storage().data_ptr():
        return False
    if out.dtype == zs.dtype and out.data_ptr() == zs.data_ptr() and \
            out.stride() == zs.stride():
        return False  # element-wise in place
    if (zs.dtype == torch.float32 and out.element_size() == 2 and out.data_ptr() ==
            zs.data_ptr() and out.stride(0) == 2 * zs.stride(0)):
        return True
    raise ValueError("triton backend: out overlaps zs but is neither zs itself nor 16-bit "
                     f"values packed over its fp32 rows (zs {zs.dtype} strides {zs.stride()}, "
                     f"out {out.dtype} strides {out.stride()})")


def packed_grad_min_rows(device: torch.device) -> int | None:
    """Rows per chunk from which the driver may pack a 16-bit dL/dz over the fp32 student
    logits (saving a [C, V] buffer): the packed pass runs one program per row, so below
    two programs per SM it would leave the GPU idle."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return 2 * _sm_count(index)
    return 1


def not_supported_reasons(device: torch.device, dtype: torch.dtype, spec: RowSpec) -> list[str]:
    why = []
    if dtype == torch.float64:
        why.append("triton backend computes in fp32 and takes no float64 logits "
                   "(use impl='torch' for float64)")
    elif dtype not in _DTYPES:
        why.append(f"triton backend needs float32/bfloat16/float16 logits, got {dtype}")
    if device.type == "cpu":
        if not _INTERPRETED:
            why.append("triton backend runs on CPU tensors only through the Triton "
                       "interpreter: set TRITON_INTERPRET=1 before importing kdkernels")
    elif device.type != "cuda":
        why.append(f"triton backend runs on CUDA devices (or CPU with TRITON_INTERPRET=1), "
                   f"not {device.type}")
    elif not torch.cuda.is_available():
        why.append("triton backend: CUDA is not available")
    return why


def workspace_bytes_per_logit(dtype: torch.dtype, device_type: str = "cuda") -> int:
    # The two [C, V] inputs only: the kernels keep no [C, V] temporaries (partials are
    # [splits, C, len(STATS)] fp32, negligible).
    return 2 * torch.empty((), dtype=dtype).element_size()


BACKEND = Backend(
    name="triton",
    stats=stats,
    mix=mix,
    grad=grad,
    not_supported_reasons=not_supported_reasons,
    workspace_bytes_per_logit=workspace_bytes_per_logit,
    packed_grad_min_rows=packed_grad_min_rows,
    student_stats=student_stats,
    student_grad=student_grad,
)
