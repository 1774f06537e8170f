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

from ..backends.base import Backend, RowSpec
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


class ChunkOptions(Protocol):
    """The options the chunk planner reads (KDOptions, TopKOptions)."""

    @property
    def chunk_size(self) -> int | None: ...

    @property
    def workspace_budget(self) -> int: ...


class LossPlan(Protocol):
    """What the driver reads of a loss's plan (dense.plan.Plan, sparse.plan.SparsePlan):
    the options, the row spec, the row kernels, the reducer, the student's compute dtype."""

    @property
    def opts(self) -> ChunkOptions: ...

    @property
    def spec(self) -> RowSpec: ...

    @property
    def backend(self) -> Backend: ...

    @property
    def reducer(self) -> Reducer: ...

    @property
    def compute_dtype_s(self) -> torch.dtype: ...


@dataclass(frozen=True)
class ChunkRun:
    """One run of the chunk loop: which rows of the flat inputs, and what to compute."""

    idx: torch.Tensor | None  # [n_kept] the kept rows; None: every row
    n_kept: int
    want_h: bool
    want_w: bool
    want_b: bool
    acc_dtype: torch.dtype  # of the row results and the gradient accumulators
    # d(loss)/d(row loss): a float, or [n_kept] per kept row; None: no gradient.
    row_scale: float | torch.Tensor | None = None

    @property
    def need_grad(self) -> bool:
        return self.row_scale is not None and (self.want_h or self.want_w or self.want_b)


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
    def bytes_per_row(x: torch.Tensor, idx: torch.Tensor | None, dtype: torch.dtype) -> int:
        """The staging bytes per row of a RowSource over x (0 where chunks are views of x)."""
        return 0 if idx is None and x.dtype == dtype else x.shape[1] * dtype.itemsize

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


def _stages_grad_hidden(run: ChunkRun, h_dtype: torch.dtype, cd_s: torch.dtype) -> bool:
    """Whether grad_hidden rows pass through a [C, Ds] stage (to be scattered or cast)."""
    return run.idx is not None or grad_hidden_dtype(h_dtype, cd_s) != cd_s


def plan_fused(plan: LossPlan, run: ChunkRun, h: torch.Tensor, vocab: int,
               teacher: tuple[torch.Tensor, torch.dtype] | None = None) -> ChunkPlan:
    """The chunk plan of one fused-linear loss call over the ``run.n_kept`` kept rows of
    h [N, Ds] against a head of ``vocab`` rows. ``teacher``: the teacher's hidden states
    g [N, Dt] and their compute dtype; None: no teacher logits (sparse teachers)."""
    cd_s = plan.compute_dtype_s
    per_row = RowSource.bytes_per_row(h, run.idx, cd_s)
    if teacher is not None:
        g, cd_t = teacher
        per_row += RowSource.bytes_per_row(g, run.idx, cd_t)
    if run.need_grad and run.want_h and _stages_grad_hidden(run, h.dtype, cd_s):
        per_row += h.shape[1] * cd_s.itemsize
    return plan_chunks(n_rows=run.n_kept, width=plan.reducer.chunk_width(vocab),
                       backend=plan.backend, logits_dtype=gemm.logits_dtype(cd_s, h.device),
                       grad_dtype=cd_s if run.need_grad else None, device=h.device,
                       budget=plan.opts.workspace_budget, chunk_size=plan.opts.chunk_size,
                       bytes_per_row=per_row, student_only=teacher is None)


def plan_logits(plan: LossPlan, zs: torch.Tensor, n_rows: int, vocab: int, *,
                student_only: bool = False) -> int:
    """Rows per chunk of a loss over materialised logits zs [N, V] (``vocab`` columns used):
    dL/dz has a tensor of its own (the gradient returned to the caller), so no dz layout."""
    return plan_chunks(n_rows=n_rows, width=plan.reducer.chunk_width(vocab),
                       backend=plan.backend, logits_dtype=zs.dtype, grad_dtype=None,
                       device=zs.device, budget=plan.opts.workspace_budget,
                       chunk_size=plan.opts.chunk_size, student_only=student_only).rows


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


def student_chunks(plan: LossPlan, run: ChunkRun, chunks: ChunkPlan, h: torch.Tensor,
                   w: torch.Tensor, bs: torch.Tensor | None, chunk_rows: ChunkRows) -> RowResult:
    """Row losses (and gradients when ``run.need_grad``) over the kept rows of h [N, Ds]: for
    each chunk of ``chunks``, the student's logits GEMM against w [V, Ds] (already in the
    compute dtype), ``chunk_rows`` (the teacher's side and the row ops), the gradient GEMMs."""
    idx, k, vocab = run.idx, run.n_kept, w.shape[0]
    n, device, cd_s, acc_dtype = h.shape[0], h.device, plan.compute_dtype_s, run.acc_dtype
    zs_dtype = gemm.logits_dtype(cd_s, device)
    need_grad, row_scale = run.need_grad, run.row_scale
    c = chunks.rows
    src_h = RowSource(h, idx, cd_s, c)
    zs_buf = torch.empty(c, vocab, dtype=zs_dtype, device=device)
    dz_buf = zs_buf
    if need_grad and chunks.dz_layout == "own":
        dz_buf = torch.empty(c, vocab, dtype=cd_s, device=device)
    elif need_grad and chunks.dz_layout == "packed":  # 16-bit dL/dz over fp32 logit rows
        dz_buf = zs_buf.view(cd_s)[:, :vocab]

    kd = torch.empty(k, dtype=acc_dtype, device=device)
    ce = torch.empty(k, dtype=acc_dtype, device=device) if plan.spec.has_ce else None
    entropy = torch.empty(k, dtype=acc_dtype, device=device)
    grad_h = gh_stage = None
    if need_grad and run.want_h:
        # grad_hidden is written in the output dtype a chunk at a time, even where the GEMMs
        # run wider (bf16 on CPUs without native half GEMMs): never a second [N, Ds] tensor.
        gh_dtype = grad_hidden_dtype(h.dtype, cd_s)
        fill = torch.empty if idx is None else torch.zeros  # ignored rows stay 0
        grad_h = fill(n, h.shape[1], dtype=gh_dtype, device=device)
        if _stages_grad_hidden(run, h.dtype, cd_s):
            gh_stage = torch.empty(c, h.shape[1], dtype=cd_s, device=device)
    want_w, want_b = need_grad and run.want_w, need_grad and run.want_b
    grad_w = torch.zeros(w.shape, dtype=acc_dtype, device=device) if want_w else None
    grad_b = torch.zeros(vocab, dtype=acc_dtype, device=device) if want_b else None
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
        grad_h = plan.reducer.finish_grad_hidden(grad_h)
    return RowResult(kd, ce, grad_h, grad_w, grad_b, entropy)


