"""The dense teacher's rows: its logits GEMM per chunk and the row ops over the student's and
the teacher's logits (the fused loss through the engine's chunk loop, and the loss on
materialised logits)."""

from __future__ import annotations

import torch

from ..backends.base import RowSpec
from ..divergences import row_kd_and_aux
from ..engine import gemm
from ..engine.driver import (
    ChunkRun,
    RowResult,
    RowSource,
    plan_fused,
    plan_logits,
    scale_slice,
    student_chunks,
)
from ..layouts import COEF
from ..row_stats import finish, norms
from .plan import Plan


def local_labels(labels: torch.Tensor | None, spec: RowSpec, start: int, width: int,
                  rows: int, device: torch.device) -> torch.Tensor:
    if labels is None or not spec.has_ce:
        return torch.full((rows,), -1, dtype=torch.int64, device=device)
    local = labels - start
    return torch.where((local >= 0) & (local < width), local, torch.full_like(local, -1))


def _row_coefficients(plan: Plan, totals, aux: torch.Tensor,
                      row_scale: torch.Tensor) -> torch.Tensor:
    opts, spec = plan.opts, plan.spec
    named = dict(totals._asdict(), aux=aux)
    # dL/dx of the raw logit x is scale_s * dL/dz: a factor on every term of the gradient.
    row_scale = row_scale * spec.student_scale
    named["kd"] = ((opts.soft_scale * spec.inv_t) * row_scale).to(aux.dtype)
    named["ce"] = ((opts.ce_weight * row_scale) if spec.has_ce
                   else torch.zeros_like(row_scale)).to(aux.dtype)
    return torch.stack([named[name] for name in COEF], 1)


def _chunk_rows(plan: Plan, zs, zt, labels_local, row_scale, grad_out):
    """Row ops over one chunk; returns (kd, ce, entropy) and, if grad_out is given, writes
    dL/dzs."""
    spec, backend, reducer = plan.spec, plan.backend, plan.reducer
    stats = reducer.merge_stats(backend.stats(zs, zt, labels_local, spec))
    totals = finish(stats)
    mix = None
    if spec.needs_mix:
        mix = reducer.sum_rows(backend.mix(zs, zt, norms(totals), spec))
    kd, aux = row_kd_and_aux(spec.divergence_record, totals, mix, dict(spec.params))
    ce = ((totals.m_z - totals.z_label) + totals.log_s_z) if spec.has_ce else None
    if grad_out is not None:
        coef = _row_coefficients(plan, totals, aux, row_scale)
        backend.grad(zs, zt, labels_local, coef, spec, grad_out)
    # Without want_entropy the stats hold no e_a (and its vocab merge moved their zeros):
    # report 0, never a half-formed entropy (only return_components reports it at all).
    return kd, ce, totals.entropy if spec.want_entropy else torch.zeros_like(kd)


class DenseChunks:
    """The dense teacher's side of a chunk: its logits GEMM, then the row ops."""

    def __init__(self, plan: Plan, g: torch.Tensor, u: torch.Tensor, bt: torch.Tensor | None,
                 lab: torch.Tensor | None, idx: torch.Tensor | None, rows: int) -> None:
        self.plan, self.u, self.bt, self.lab = plan, u, bt, lab
        self.src_g = RowSource(g, idx, plan.compute_dtype_t, rows)
        self.zt_buf = torch.empty(rows, u.shape[0],
                                  dtype=gemm.logits_dtype(plan.compute_dtype_t, g.device),
                                  device=g.device)

    def __call__(self, start, stop, zs, dz, scale):
        zt = gemm.logits_into(self.src_g.take(start, stop), self.u, self.bt,
                              self.zt_buf[: stop - start])
        lab_c = local_labels(None if self.lab is None else self.lab[start:stop],
                             self.plan.spec, self.plan.reducer.vocab_start, zs.shape[1],
                             stop - start, zs.device)
        return _chunk_rows(self.plan, zs, zt, lab_c, scale, dz)

    def release(self) -> None:
        self.zt_buf.untyped_storage().resize_(0)
        self.src_g.release()


def fused_rows(plan: Plan, run: ChunkRun, h: torch.Tensor, w: torch.Tensor,
               bs: torch.Tensor | None, g: torch.Tensor, u: torch.Tensor,
               bt: torch.Tensor | None, labels: torch.Tensor | None) -> RowResult:
    """Row losses (and gradients when ``run.need_grad``) over the kept rows of h [N, Ds],
    g [N, Dt]: all rows if ``run.idx`` is None, else rows ``run.idx`` (labels [N] are global
    ids).

    w [V, Ds] and u [V, Dt] are the heads already cut to the shared vocabulary in the
    compute dtypes of ``plan``; h and g are read (and cast) a chunk at a time.
    """
    chunks = plan_fused(plan, run, h, w.shape[0], teacher=(g, plan.compute_dtype_t))
    idx = run.idx
    lab = None if labels is None else (labels if idx is None else labels.index_select(0, idx))
    rows = DenseChunks(plan, g, u, bt, lab, idx, chunks.rows)
    return student_chunks(plan, run, chunks, h, w, bs, rows)


def logits_rows(plan: Plan, zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None,
                row_scale: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Row losses over materialised logits zs [N, Vs], zt [N, Vt] (shared vocab = min);
    returns (kd [N], ce [N] | None, student entropy [N], grad [N, Vs] in zs's dtype | None).
    Rows whose row_scale is 0 get zero gradient."""
    spec, reducer = plan.spec, plan.reducer
    n, vocab = zs.shape[0], min(zs.shape[1], zt.shape[1])
    c = plan_logits(plan, zs, n, vocab)
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
            plan, zs[start:stop, :vocab], zt[start:stop, :vocab], lab, scale, out)
        kd[start:stop] = kd_c
        if ce is not None:
            ce[start:stop] = ce_c
    return kd, ce, entropy, grad
