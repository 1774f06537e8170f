"""The chunk driver: for each token chunk, logits GEMMs -> row ops -> gradient GEMMs.

Written once for every backend. The workspace (the [C, V] buffers, and staging for gathered
hidden rows) is allocated once per call from the chunk plan (chunking.py) and reused by
every chunk. Rows of ignored tokens are never copied as a whole: each chunk gathers its kept
rows into the staging buffer, and their hidden gradients go straight into the full
grad_hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..backends.base import Backend
from ..options import KDOptions
from . import gemm
from .chunking import ChunkPlan, plan_chunks
from .local_reducer import Reducer


@dataclass
class RowResult:
    kd: torch.Tensor  # [K] divergence per kept row (unscaled), fp32
    ce: torch.Tensor | None  # [K] hard-label CE per kept row, fp32
    grad_h: torch.Tensor | None = None  # [N, Ds] (grad_hidden_dtype), 0 at ignored rows
    grad_w: torch.Tensor | None = None  # [V, Ds] fp32 accumulator
    grad_b: torch.Tensor | None = None  # [V] fp32 accumulator
    entropy: torch.Tensor | None = None  # [K] entropy of the tempered student per kept row


class RowSource:
    """Chunks of the kept rows of x [N, D] in ``dtype``: views of x where they can be, else
    gathered (and cast) into one staging buffer of ``rows`` rows."""

    def __init__(self, x: torch.Tensor, idx: torch.Tensor | None, dtype: torch.dtype,
                 rows: int) -> None:
        self.x, self.idx, self.dtype = x, idx, dtype
        self.direct = idx is None and x.dtype == dtype
        self.stage = None if self.direct else torch.empty(rows, x.shape[1], dtype=dtype,
                                                          device=x.device)

    @staticmethod
    def staged(idx: torch.Tensor | None, x_dtype: torch.dtype, dtype: torch.dtype) -> bool:
        return idx is not None or x_dtype != dtype

    def take(self, start: int, stop: int) -> torch.Tensor:
        if self.direct:
            return self.x[start:stop]
        out = self.stage[: stop - start]
        if self.idx is None:
            return out.copy_(self.x[start:stop])
        rows = self.idx[start:stop]
        if self.x.dtype == self.dtype:
            return torch.index_select(self.x, 0, rows, out=out)
        return out.copy_(self.x.index_select(0, rows))  # a chunk-sized temporary

    def release(self) -> None:
        if self.stage is not None:
            self.stage.untyped_storage().resize_(0)


def grad_hidden_dtype(out_dtype: torch.dtype, cd_s: torch.dtype) -> torch.dtype:
    """The dtype grad_hidden is assembled in: the gradient's own (the input's) when the
    GEMMs run wider than it, so that no wide [N, Ds] copy waits for a final cast."""
    return out_dtype if out_dtype.itemsize < cd_s.itemsize else cd_s


def plan_fused(opts: KDOptions, backend: Backend, reducer: Reducer, *, n_rows: int,
               vocab: int, ds: int, dt: int, h_dtype: torch.dtype, g_dtype: torch.dtype,
               cd_s: torch.dtype, cd_t: torch.dtype, idx: torch.Tensor | None,
               need_grad: bool, want_h: bool, device: torch.device) -> ChunkPlan:
    """The chunk plan of one fused-linear loss call over ``n_rows`` kept rows."""
    per_row = 0
    if RowSource.staged(idx, h_dtype, cd_s):
        per_row += ds * cd_s.itemsize
    if RowSource.staged(idx, g_dtype, cd_t):
        per_row += dt * cd_t.itemsize
    if need_grad and want_h and (idx is not None or grad_hidden_dtype(h_dtype, cd_s) != cd_s):
        per_row += ds * cd_s.itemsize  # grad_hidden rows before they are scattered or cast
    return plan_chunks(n_rows=n_rows, width=reducer.chunk_width(vocab), backend=backend,
                       logits_dtype=gemm.logits_dtype(cd_s, device),
                       grad_dtype=cd_s if need_grad else None, device=device,
                       budget=opts.workspace_budget, chunk_size=opts.chunk_size,
                       bytes_per_row=per_row)


def scale_slice(row_scale, start, stop, like):
    if isinstance(row_scale, torch.Tensor):
        return row_scale[start:stop].to(like.dtype)
    return torch.full((stop - start,), float(row_scale), dtype=like.dtype, device=like.device)


class ChunkRows(Protocol):
    """The row work of one chunk of kept rows [start, stop) over its student logits ``zs``:
    returns (kd, ce | None, student entropy) and writes dL/dzs into ``dz`` when it is
    given."""

    def __call__(self, start: int, stop: int, zs: torch.Tensor, dz: torch.Tensor | None,
                 scale: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]: ...

    def release(self) -> None:
        """Free this object's workspace (before the accumulators are finished)."""
        ...


def student_chunks(h: torch.Tensor, w: torch.Tensor, bs: torch.Tensor | None,
                   chunk_rows: ChunkRows, *, idx: torch.Tensor | None, n_kept: int,
                   chunks: ChunkPlan, cd_s: torch.dtype,
                   row_scale: float | torch.Tensor | None, want_h: bool, want_w: bool,
                   want_b: bool, reducer: Reducer, acc_dtype: torch.dtype,
                   has_ce: bool) -> RowResult:
    """The chunk loop over the kept rows of h [N, Ds] (see fused_rows): the student's logits
    GEMM, ``chunk_rows`` (the teacher's side and the row ops), the gradient GEMMs."""
    n, k, vocab = h.shape[0], n_kept, w.shape[0]
    device = h.device
    zs_dtype = gemm.logits_dtype(cd_s, device)
    need_grad = row_scale is not None and (want_h or want_w or want_b)
    c = chunks.rows
    src_h = RowSource(h, idx, cd_s, c)
    zs_buf = torch.empty(c, vocab, dtype=zs_dtype, device=device)
    dz_buf = zs_buf
    if need_grad and chunks.dz_layout == "own":
        dz_buf = torch.empty(c, vocab, dtype=cd_s, device=device)
    elif need_grad and chunks.dz_layout == "packed":  # 16-bit dL/dz over fp32 logit rows
        dz_buf = zs_buf.view(cd_s)[:, :vocab]

    kd = torch.empty(k, dtype=acc_dtype, device=device)
    ce = torch.empty(k, dtype=acc_dtype, device=device) if has_ce else None
    entropy = torch.empty(k, dtype=acc_dtype, device=device)
    grad_h = gh_stage = None
    if need_grad and want_h:
        # grad_hidden is written in the output dtype a chunk at a time, even where the GEMMs
        # run wider (bf16 on CPUs without native half GEMMs): never a second [N, Ds] tensor.
        gh_dtype = grad_hidden_dtype(h.dtype, cd_s)
        fill = torch.empty if idx is None else torch.zeros  # ignored rows stay 0
        grad_h = fill(n, h.shape[1], dtype=gh_dtype, device=device)
        if idx is not None or gh_dtype != cd_s:
            gh_stage = torch.empty(c, h.shape[1], dtype=cd_s, device=device)
    grad_w = torch.zeros(w.shape, dtype=acc_dtype, device=device) if need_grad and want_w else None
    grad_b = torch.zeros(vocab, dtype=acc_dtype, device=device) if need_grad and want_b else None
    # fp16 cannot hold dL/dz already divided by N (it underflows at N ~ 1e4): the row ops
    # write it unscaled and the scalar goes on the GEMM results instead.
    post_scale = 1.0
    if need_grad and dz_buf.dtype == torch.float16 and not isinstance(row_scale, torch.Tensor):
        post_scale, row_scale = float(row_scale), 1.0
    for start in chunks.starts(k):
        stop = min(k, start + c)
        h_c = src_h.take(start, stop)
        zs = gemm.logits_into(h_c, w, bs, zs_buf[: stop - start])
        dz = dz_buf[: stop - start] if need_grad else None
        scale = scale_slice(row_scale, start, stop, kd) if need_grad else None
        kd_c, ce_c, entropy[start:stop] = chunk_rows(start, stop, zs, dz, scale)
        kd[start:stop] = kd_c
        if ce is not None:
            ce[start:stop] = ce_c
        if not need_grad:
            continue
        if grad_h is not None:
            if gh_stage is None:
                torch.mm(dz, w, out=grad_h[start:stop])
            elif idx is None:
                grad_h[start:stop] = torch.mm(dz, w, out=gh_stage[: stop - start])
            else:
                part = torch.mm(dz, w, out=gh_stage[: stop - start])
                grad_h.index_copy_(0, idx[start:stop], part.to(grad_h.dtype))
        if grad_w is not None:
            gemm.accumulate_matmul_(grad_w, dz.t(), h_c)
        if grad_b is not None:
            grad_b += dz.sum(0, dtype=acc_dtype)
    # Free the workspace before the callers cast the accumulators to the output dtype, even
    # if a view of it is still referenced somewhere: the two must never coexist at the peak.
    for buf in (zs_buf, dz_buf, gh_stage):
        if buf is not None:
            buf.untyped_storage().resize_(0)
    src_h.release()
    chunk_rows.release()
    del zs_buf, dz_buf, gh_stage
    if post_scale != 1.0:
        for acc in (grad_h, grad_w, grad_b):
            if acc is not None:
                acc *= post_scale
    if grad_h is not None:
        grad_h = reducer.finish_grad_hidden(grad_h)
    return RowResult(kd, ce, grad_h, grad_w, grad_b, entropy)


