"""Compile the row kernels for a GPU target without a GPU: `python -m
kdkernels.triton_kernels.compile_check [--arch 90]`.

The CPU interpreter runs the kernels' Python, not Triton's compiler, so it misses what only
compilation rejects (non-constexpr globals, type mismatches across loop iterations, ...).
This builds representative specialisations to PTX for the target (Triton's bundled
toolchain, no driver needed) and reports the global loads and stores per kernel: 16-byte
vectors (`v4.b32`) are what the bandwidth targets need. Must run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter

from ..divergences import BY_NAME
from ..layouts import CONSTS, MIX_KINDS, STATS_WEIGHTS

# (kernel, pointer dtypes, constexprs); runtime scalars are i32, or fp32 for the row
# constants (kernel arguments named as in layouts.CONSTS).
_PTRS = {
    "stats": ("zs_ptr", "zt_ptr", "labels_ptr", "part_ptr"),
    "merge": ("part_ptr", "out_ptr"),
    "mix": ("zs_ptr", "zt_ptr", "norms_ptr", "part_ptr"),
    "grad": ("zs_ptr", "zt_ptr", "labels_ptr", "coef_ptr", "out_ptr"),
}
_FLOATS = set(CONSTS)
# Arguments the runtime specialises as multiples of 16 in the driver's buffers.
_ALIGNED = {"zs_ptr", "zt_ptr", "out_ptr", "part_ptr", "labels_ptr", "coef_ptr", "norms_ptr",
            "stride_s", "stride_t", "stride_o", "span", "n_cols"}
_FLAGS = dict(HAS_CAP_S=False, HAS_CAP_T=False, TEMPERED=False)
_ALL_ON = dict(HAS_CAP_S=True, HAS_CAP_T=True, TEMPERED=True)


def _div(name: str) -> int:
    return BY_NAME[name].code


def _weight(name: str) -> int:
    return getattr(STATS_WEIGHTS, BY_NAME[name].stats_weight)


CASES = [
    ("stats", ("fp32", "fp32", "i64", "fp32"),
     dict(STATS_WEIGHT=_weight("forward_kl"), HAS_CE=False, BLOCK_R=1, BLOCK_V=2048,
          SEPARATE_Z=False, WANT_ENTROPY=True, **_FLAGS)),
    ("stats", ("bf16", "bf16", "i64", "fp32"),
     dict(STATS_WEIGHT=_weight("reverse_kl"), HAS_CE=True, BLOCK_R=1, BLOCK_V=4096,
          WANT_ENTROPY=True, SEPARATE_Z=True, **_ALL_ON)),
    ("stats", ("fp16", "bf16", "i64", "fp32"),
     dict(STATS_WEIGHT=_weight("forward_kl"), HAS_CE=True, BLOCK_R=8, BLOCK_V=256,
          WANT_ENTROPY=False, SEPARATE_Z=False, **_FLAGS)),
    ("stats", ("bf16", "fp32", "i64", "fp32"),
     dict(STATS_WEIGHT=_weight("alpha"), HAS_CE=False, BLOCK_R=1, BLOCK_V=4096,
          WANT_ENTROPY=True, SEPARATE_Z=False, **_FLAGS)),
    ("merge", ("fp32", "fp32"), dict(BLOCK_R=128, BLOCK_P=8, WANT_ENTROPY=True)),
    ("merge", ("fp32", "fp32"), dict(BLOCK_R=128, BLOCK_P=8, WANT_ENTROPY=False)),
    ("mix", ("fp32", "fp32", "fp32", "fp32"),
     dict(DIV=_div("jsd"), BLOCK_R=1, BLOCK_V=2048, MIX_KIND=MIX_KINDS.both, **_FLAGS)),
    ("mix", ("bf16", "bf16", "fp32", "fp32"),
     dict(DIV=_div("skew_reverse_kl"), BLOCK_R=1, BLOCK_V=4096, MIX_KIND=MIX_KINDS.only_q,
          **_ALL_ON)),
    ("mix", ("fp32", "fp32", "fp32", "fp32"),
     dict(DIV=_div("tvd"), BLOCK_R=2, BLOCK_V=1024, MIX_KIND=MIX_KINDS.both, **_FLAGS)),
    ("mix", ("fp32", "fp32", "fp32", "fp32"),
     dict(DIV=_div("alpha"), BLOCK_R=1, BLOCK_V=2048, MIX_KIND=MIX_KINDS.both, **_FLAGS)),
    ("mix", ("bf16", "fp16", "fp32", "fp32"),
     dict(DIV=_div("alpha"), BLOCK_R=4, BLOCK_V=512, MIX_KIND=MIX_KINDS.both, **_ALL_ON)),
    ("grad", ("fp32", "fp32", "i64", "fp32", "bf16"),
     dict(DIV=_div("forward_kl"), HAS_CE=False, BLOCK_R=1, BLOCK_V=2048,
          MIX_KIND=MIX_KINDS.both, ROUND_BF16=False, PACKED=False, **_FLAGS)),
    ("grad", ("bf16", "bf16", "i64", "fp32", "bf16"),
     dict(DIV=_div("skew_forward_kl"), HAS_CE=True, BLOCK_R=1, BLOCK_V=4096,
          MIX_KIND=MIX_KINDS.only_p, ROUND_BF16=True, PACKED=False, **_ALL_ON)),
    ("grad", ("fp32", "fp16", "i64", "fp32", "fp32"),
     dict(DIV=_div("skew_reverse_kl"), HAS_CE=True, BLOCK_R=4, BLOCK_V=512,
          MIX_KIND=MIX_KINDS.both, ROUND_BF16=False, PACKED=False, **_FLAGS)),
    ("grad", ("bf16", "bf16", "i64", "fp32", "bf16"),
     dict(DIV=_div("alpha"), HAS_CE=True, BLOCK_R=1, BLOCK_V=4096, MIX_KIND=MIX_KINDS.both,
          ROUND_BF16=False, PACKED=False, **_ALL_ON)),
    # the CUDA driver's big-chunk layout: bf16 dL/dz packed over the fp32 student logits
    ("grad", ("fp32", "fp32", "i64", "fp32", "bf16"),
     dict(DIV=_div("jsd"), HAS_CE=True, BLOCK_R=1, BLOCK_V=2048, MIX_KIND=MIX_KINDS.both,
          ROUND_BF16=False, PACKED=True, **_FLAGS)),
    ("grad", ("fp32", "bf16", "i64", "fp32", "fp16"),
     dict(DIV=_div("alpha"), HAS_CE=True, BLOCK_R=1, BLOCK_V=2048, MIX_KIND=MIX_KINDS.both,
          ROUND_BF16=False, PACKED=True, HAS_CAP_S=True, HAS_CAP_T=False, TEMPERED=True)),
]

def _kernels():
    from .grad import grad_kernel
    from .mix import mix_kernel
    from .stats import merge_kernel, stats_kernel

    return {"stats": stats_kernel, "merge": merge_kernel, "mix": mix_kernel,
            "grad": grad_kernel}


def compile_case(name: str, ptr_types: tuple[str, ...], consts: dict, arch: int,
                 num_warps: int | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernels()[name]
    fn = kernel if isinstance(kernel, triton.runtime.JITFunction) else kernel.fn
    ptrs = dict(zip(_PTRS[name], ptr_types, strict=True))
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in ptrs:
            sig[arg] = "*" + ptrs[arg]
        else:
            sig[arg] = "fp32" if arg in _FLOATS else "i32"
        if arg in _ALIGNED and sig[arg] != "constexpr":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    if num_warps is None:  # the backend's rule: 16 elements per thread and step
        tile = consts.get("BLOCK_R", 1) * consts.get("BLOCK_V", 2048)
        num_warps = max(1, min(16, tile // 512))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def memory_ops(ptx: str) -> dict[str, int]:
    """Global loads/stores by width, and CTA barriers (``bar``)."""
    ops = Counter(re.findall(r"(?:ld|st)\.global[\w.]*", ptx))
    ops["bar"] = len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx))
    return dict(ops)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="compile the Triton row kernels for a GPU target")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    failed = 0
    for name, ptr_types, consts in CASES:
        try:
            compiled = compile_case(name, ptr_types, consts, args.arch)
        except Exception as err:  # report every case, then fail
            failed += 1
            print(f"FAIL {name} {ptr_types} {consts}: {type(err).__name__}: {err}")
            continue
        print(f"ok   {name} {'/'.join(ptr_types)} {consts}: {memory_ops(compiled.asm['ptx'])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
