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

from . import gemm
from .backends.base import Backend, RowSpec
from .chunking import ChunkPlan, plan_chunks
from .divergences import row_kd_and_aux
from .layouts import COEF
from .options import KDOptions
from .reducer import Reducer
from .row_stats import finish, norms


@dataclass
class RowResult:
    kd: torch.Tensor  # [K] divergence per kept row (unscaled), fp32
    ce: torch.Tensor | None  # [K] hard-label CE per kept row, fp32
    grad_h: torch.Tensor | None = None  # [N, Ds] in the compute dtype, 0 at ignored rows
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


def _local_labels(labels: torch.Tensor | None, spec: RowSpec, start: int, width: int,
                  rows: int, device: torch.device) -> torch.Tensor:
    if labels is None or not spec.has_ce:
        return torch.full((rows,), -1, dtype=torch.int64, device=device)
    local = labels - start
    return torch.where((local >= 0) & (local < width), local, torch.full_like(local, -1))


def _row_coefficients(opts: KDOptions, spec: RowSpec, totals, aux: torch.Tensor,
                      row_scale: torch.Tensor) -> torch.Tensor:
    named = dict(totals._asdict(), aux=aux)
    # dL/dx of the raw logit x is scale_s * dL/dz: a factor on every term of the gradient.
    row_scale = row_scale * spec.student_scale
    named["kd"] = ((opts.soft_scale * spec.inv_t) * row_scale).to(aux.dtype)
    named["ce"] = ((opts.ce_weight * row_scale) if spec.has_ce
                   else torch.zeros_like(row_scale)).to(aux.dtype)
    return torch.stack([named[name] for name in COEF], 1)


def _chunk_rows(zs, zt, labels_local, opts, spec, backend, reducer, row_scale, grad_out):
    """Row ops over one chunk; returns (kd, ce, entropy) and, if grad_out is given, writes
    dL/dzs."""
    stats = reducer.merge_stats(backend.stats(zs, zt, labels_local, spec))
    totals = finish(stats)
    mix = None
    if spec.needs_mix:
        mix = reducer.sum_rows(backend.mix(zs, zt, norms(totals), spec))
    kd, aux = row_kd_and_aux(spec.divergence_record, totals, mix, dict(spec.params))
    ce = ((totals.m_z - totals.z_label) + totals.log_s_z) if spec.has_ce else None
    if grad_out is not None:
        coef = _row_coefficients(opts, spec, totals, aux, row_scale)
        backend.grad(zs, zt, labels_local, coef, spec, grad_out)
    return kd, ce, totals.entropy


def _scale_slice(row_scale, start, stop, like):
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


class DenseChunks:
    """The dense teacher's side of a chunk: its logits GEMM, then the row ops."""

    def __init__(self, g, u, bt, lab, opts, spec, backend, reducer, *, idx, rows, cd_t):
        self.u, self.bt, self.lab = u, bt, lab
        self.opts, self.spec, self.backend, self.reducer = opts, spec, backend, reducer
        self.src_g = RowSource(g, idx, cd_t, rows)
        self.zt_buf = torch.empty(rows, u.shape[0], dtype=gemm.logits_dtype(cd_t, g.device),
                                  device=g.device)

    def __call__(self, start, stop, zs, dz, scale):
        zt = gemm.logits_into(self.src_g.take(start, stop), self.u, self.bt,
                              self.zt_buf[: stop - start])
        lab_c = _local_labels(None if self.lab is None else self.lab[start:stop], self.spec,
                              self.reducer.vocab_start, zs.shape[1], stop - start, zs.device)
        return _chunk_rows(zs, zt, lab_c, self.opts, self.spec, self.backend, self.reducer,
                           scale, dz)

    def release(self) -> None:
        self.zt_buf.untyped_storage().resize_(0)
        self.src_g.release()


def fused_rows(h: torch.Tensor, w: torch.Tensor, bs: torch.Tensor | None,
               g: torch.Tensor, u: torch.Tensor, bt: torch.Tensor | None,
               labels: torch.Tensor | None, opts: KDOptions, spec: RowSpec, backend: Backend,
               *, idx: torch.Tensor | None, n_kept: int, chunks: ChunkPlan,
               cd_s: torch.dtype, cd_t: torch.dtype,
               row_scale: float | torch.Tensor | None, want_h: bool, want_w: bool,
               want_b: bool, reducer: Reducer, acc_dtype: torch.dtype) -> RowResult:
    """Row losses (and gradients unless row_scale is None) over the kept rows of h [N, Ds],
    g [N, Dt]: all rows if ``idx`` is None, else rows ``idx`` [n_kept] (labels [N] are global
    ids). ``row_scale``: a float, or [n_kept] per kept row.

    w [V, Ds] and u [V, Dt] are the heads already cut to the shared vocabulary in the
    compute dtypes cd_s / cd_t; h and g are read (and cast) a chunk at a time.
    """
    lab = None if labels is None else (labels if idx is None else labels.index_select(0, idx))
    rows = DenseChunks(g, u, bt, lab, opts, spec, backend, reducer, idx=idx, rows=chunks.rows,
                       cd_t=cd_t)
    return student_chunks(h, w, bs, rows, idx=idx, n_kept=n_kept, chunks=chunks, cd_s=cd_s,
                          row_scale=row_scale, want_h=want_h, want_w=want_w, want_b=want_b,
                          reducer=reducer, acc_dtype=acc_dtype, has_ce=spec.has_ce)


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
        scale = _scale_slice(row_scale, start, stop, kd) if need_grad else None
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


def logits_rows(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None,
                opts: KDOptions, spec: RowSpec, backend: Backend, *,
                row_scale: float | torch.Tensor | None, reducer: Reducer
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Row losses over materialised logits zs [N, Vs], zt [N, Vt] (shared vocab = min);
    returns (kd [N], ce [N] | None, student entropy [N], grad [N, Vs] in zs's dtype | None).
    Rows whose row_scale is 0 get zero gradient."""
    n, vocab = zs.shape[0], min(zs.shape[1], zt.shape[1])
    # dL/dz has a tensor of its own (the gradient returned to the caller): no dz layout.
    c = plan_chunks(n_rows=n, width=reducer.chunk_width(vocab), backend=backend,
                    logits_dtype=zs.dtype, grad_dtype=None, device=zs.device,
                    budget=opts.workspace_budget, chunk_size=opts.chunk_size).rows
    row_dtype = torch.float64 if zs.dtype == torch.float64 else torch.float32
    kd = torch.empty(n, dtype=row_dtype, device=zs.device)
    ce = torch.empty(n, dtype=row_dtype, device=zs.device) if spec.has_ce else None
    entropy = torch.empty(n, dtype=row_dtype, device=zs.device)
    grad = None
    if row_scale is not None:
        grad = torch.empty_like(zs, memory_format=torch.contiguous_format)
        if zs.shape[1] > vocab:
            grad[:, vocab:] = 0
    for start in range(0, n, c):
        stop = min(n, start + c)
        lab = _local_labels(None if labels is None else labels[start:stop], spec,
                            reducer.vocab_start, vocab, stop - start, zs.device)
        out = grad[start:stop, :vocab] if grad is not None else None
        scale = _scale_slice(row_scale, start, stop, kd) if grad is not None else None
        kd_c, ce_c, entropy[start:stop] = _chunk_rows(
            zs[start:stop, :vocab], zt[start:stop, :vocab], lab, opts, spec, backend, reducer,
            scale, out)
        kd[start:stop] = kd_c
        if ce is not None:
            ce[start:stop] = ce_c
    return kd, ce, entropy, grad
