"""The dense teacher's rows: its logits GEMM per chunk and the row ops over the student's and
the teacher's logits (the fused loss through the engine's chunk loop, and the loss on
materialised logits)."""

from __future__ import annotations

import torch

from ..backends.base import Backend, RowSpec
from ..divergences import row_kd_and_aux
from ..engine import gemm
from ..engine.chunking import ChunkPlan, plan_chunks
from ..engine.driver import RowResult, RowSource, scale_slice, student_chunks
from ..engine.local_reducer import Reducer
from ..layouts import COEF
from ..options import KDOptions
from ..row_stats import finish, norms


def local_labels(labels: torch.Tensor | None, spec: RowSpec, start: int, width: int,
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
        lab_c = local_labels(None if self.lab is None else self.lab[start:stop], self.spec,
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
        lab = local_labels(None if labels is None else labels[start:stop], spec,
                            reducer.vocab_start, vocab, stop - start, zs.device)
        out = grad[start:stop, :vocab] if grad is not None else None
        scale = scale_slice(row_scale, start, stop, kd) if grad is not None else None
        kd_c, ce_c, entropy[start:stop] = _chunk_rows(
            zs[start:stop, :vocab], zt[start:stop, :vocab], lab, opts, spec, backend, reducer,
            scale, out)
        kd[start:stop] = kd_c
        if ce is not None:
            ce[start:stop] = ce_c
    return kd, ce, entropy, grad
