"""The chunk driver: for each token chunk, logits GEMMs -> row ops -> gradient GEMMs.

Written once for every backend. The workspace (the [C, V] buffers) is allocated once per
call and reused by every chunk, so its size is bounded by the chunk rule below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import gemm
from .backends.base import Backend, RowSpec
from .divergences import row_kd_and_aux
from .options import KDOptions
from .reducer import LocalReducer
from .row_stats import finish, norms


@dataclass
class RowResult:
    kd: torch.Tensor  # [K] divergence per row (unscaled), fp32
    ce: torch.Tensor | None  # [K] hard-label CE per row, fp32
    grad_h: torch.Tensor | None = None  # [K, Ds]
    grad_w: torch.Tensor | None = None  # [V, Ds] fp32 accumulator
    grad_b: torch.Tensor | None = None  # [V] fp32 accumulator


def choose_chunk_size(opts: KDOptions, n_rows: int, vocab: int, bytes_per_logit: int,
                      device_type: str = "cpu") -> int:
    """Rows per chunk: the explicit chunk_size, else the fewest chunks whose [C, V] buffers
    fit in max_workspace_bytes, balanced so the last chunk is not a small remainder (at
    least one row). Fewer chunks matter most: every chunk re-reads and re-writes the fp32
    grad_weight accumulator (measured on an H200: 4 GEMMs at N=8192, V=128256 take 62 ms
    in chunks of 209 rows, 37 ms in chunks of 836)."""
    if opts.chunk_size is not None:
        return max(1, min(opts.chunk_size, n_rows))
    budget = opts.workspace_bytes_on(device_type)
    most = max(1, min(n_rows, budget // max(1, vocab * bytes_per_logit)))
    n_chunks = -(-n_rows // most)
    return -(-n_rows // n_chunks) if n_rows else most


def _workspace_plan(opts: KDOptions, backend: Backend, rows: int, vocab: int,
                    zs_dtype: torch.dtype, dz_dtype: torch.dtype, device: torch.device,
                    need_grad: bool) -> tuple[int, str]:
    """(rows per chunk, where dL/dz goes): "in_place" over the logits (same dtype), "packed"
    (16-bit over the first half of each fp32 logit row, when the backend takes it and the
    chunk has enough rows for it), or "own" (a [C, V] buffer of its own: dz_dtype's bytes
    more per logit)."""
    base = backend.workspace_bytes_per_logit(zs_dtype, device.type)
    if not need_grad or zs_dtype == dz_dtype:
        return choose_chunk_size(opts, rows, vocab, base, device.type), "in_place"
    if zs_dtype == torch.float32 and dz_dtype.itemsize == 2:
        least = backend.packed_grad_min_rows(device)
        c = choose_chunk_size(opts, rows, vocab, base, device.type)
        if least is not None and c >= least:
            return c, "packed"
    return choose_chunk_size(opts, rows, vocab, base + dz_dtype.itemsize, device.type), "own"


def _local_labels(labels: torch.Tensor | None, spec: RowSpec, start: int, width: int,
                  rows: int, device: torch.device) -> torch.Tensor:
    if labels is None or not spec.has_ce:
        return torch.full((rows,), -1, dtype=torch.int64, device=device)
    local = labels - start
    return torch.where((local >= 0) & (local < width), local, torch.full_like(local, -1))


def _row_coefficients(opts, spec, totals, aux, row_scale) -> torch.Tensor:
    kd_coef = (opts.soft_scale / opts.temperature) * row_scale
    ce_coef = opts.ce_weight * row_scale if spec.has_ce else torch.zeros_like(row_scale)
    return torch.stack((totals.m_a, totals.log_s_a, totals.m_b, totals.log_s_b, totals.m_z,
                        totals.log_s_z, aux, kd_coef.to(aux.dtype), ce_coef.to(aux.dtype)), 1)


def _chunk_rows(zs, zt, labels_local, opts, spec, backend, reducer, row_scale, grad_out):
    """Row ops over one chunk; returns (kd, ce) and, if grad_out is given, writes dL/dzs."""
    stats = reducer.merge_stats(backend.stats(zs, zt, labels_local, spec))
    totals = finish(stats)
    mix = None
    if spec.needs_mix:
        mix = reducer.sum_rows(backend.mix(zs, zt, norms(totals), spec))
    kd, aux = row_kd_and_aux(opts, totals, mix)
    ce = ((totals.m_z - totals.z_label) + totals.log_s_z) if spec.has_ce else None
    if grad_out is not None:
        coef = _row_coefficients(opts, spec, totals, aux, row_scale)
        backend.grad(zs, zt, labels_local, coef, spec, grad_out)
    return kd, ce


def _scale_slice(row_scale, start, stop, like):
    if isinstance(row_scale, torch.Tensor):
        return row_scale[start:stop].to(like.dtype)
    return torch.full((stop - start,), float(row_scale), dtype=like.dtype, device=like.device)


def fused_rows(h: torch.Tensor, w: torch.Tensor, bs: torch.Tensor | None,
               g: torch.Tensor, u: torch.Tensor, bt: torch.Tensor | None,
               labels: torch.Tensor | None, opts: KDOptions, spec: RowSpec, backend: Backend,
               *, row_scale: float | torch.Tensor | None, want_h: bool, want_w: bool,
               want_b: bool, reducer: LocalReducer, acc_dtype: torch.dtype) -> RowResult:
    """Row losses (and gradients unless row_scale is None) over kept rows h [K, Ds], g [K, Dt].

    w [V, Ds], u [V, Dt] are the heads already cut to the shared vocabulary, in the compute
    dtype; labels [K] are global ids of kept rows.
    """
    k, vocab = h.shape[0], w.shape[0]
    device = h.device
    zs_dtype = gemm.logits_dtype(h.dtype, device)
    zt_dtype = gemm.logits_dtype(g.dtype, device)
    need_grad = row_scale is not None and (want_h or want_w or want_b)
    c, dz_layout = _workspace_plan(opts, backend, k, vocab, zs_dtype, h.dtype, device,
                                   need_grad)
    zs_buf = torch.empty(c, vocab, dtype=zs_dtype, device=device)
    zt_buf = torch.empty(c, vocab, dtype=zt_dtype, device=device)
    if dz_layout == "own":
        dz_buf = torch.empty(c, vocab, dtype=h.dtype, device=device)
    elif dz_layout == "packed":  # 16-bit dL/dz over the first half of each fp32 logit row
        dz_buf = zs_buf.view(h.dtype)[:, :vocab]
    else:
        dz_buf = zs_buf

    kd = torch.empty(k, dtype=acc_dtype, device=device)
    ce = torch.empty(k, dtype=acc_dtype, device=device) if spec.has_ce else None
    grad_h = torch.empty_like(h) if need_grad and want_h else None
    grad_w = torch.zeros(w.shape, dtype=acc_dtype, device=device) if need_grad and want_w else None
    grad_b = torch.zeros(vocab, dtype=acc_dtype, device=device) if need_grad and want_b else None
    # fp16 cannot hold dL/dz already divided by N (it underflows at N ~ 1e4): the row ops
    # write it unscaled and the scalar goes on the GEMM results instead.
    post_scale = 1.0
    if need_grad and dz_buf.dtype == torch.float16 and not isinstance(row_scale, torch.Tensor):
        post_scale, row_scale = float(row_scale), 1.0
    for start in range(0, k, c):
        stop = min(k, start + c)
        zs = gemm.logits_into(h[start:stop], w, bs, zs_buf[: stop - start])
        zt = gemm.logits_into(g[start:stop], u, bt, zt_buf[: stop - start])
        lab = _local_labels(None if labels is None else labels[start:stop], spec,
                            reducer.vocab_start, vocab, stop - start, device)
        dz = dz_buf[: stop - start] if need_grad else None
        scale = _scale_slice(row_scale, start, stop, kd) if need_grad else None
        kd_c, ce_c = _chunk_rows(zs, zt, lab, opts, spec, backend, reducer, scale, dz)
        kd[start:stop] = kd_c
        if ce is not None:
            ce[start:stop] = ce_c
        if not need_grad:
            continue
        if grad_h is not None:
            torch.mm(dz, w, out=grad_h[start:stop])
            if post_scale != 1.0:
                grad_h[start:stop] *= post_scale
        if grad_w is not None:
            gemm.accumulate_matmul_(grad_w, dz.t(), h[start:stop])
        if grad_b is not None:
            grad_b += dz.sum(0, dtype=acc_dtype)
    # Free the workspace before the callers cast the accumulators to the output dtype, even
    # if a view of it is still referenced somewhere: the two must never coexist at the peak.
    for buf in (zs_buf, zt_buf, dz_buf):
        buf.untyped_storage().resize_(0)
    del zs_buf, zt_buf, dz_buf
    if post_scale != 1.0:
        for acc in (grad_w, grad_b):
            if acc is not None:
                acc *= post_scale
    if grad_h is not None:
        grad_h = reducer.finish_grad_hidden(grad_h)
    return RowResult(kd, ce, grad_h, grad_w, grad_b)


def logits_rows(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None,
                opts: KDOptions, spec: RowSpec, backend: Backend, *,
                row_scale: float | torch.Tensor | None, reducer: LocalReducer
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Row losses over materialised logits zs [N, Vs], zt [N, Vt] (shared vocab = min);
    returns (kd [N], ce [N] | None, grad [N, Vs] in zs's dtype | None). Rows whose
    row_scale is 0 get zero gradient."""
    n, vocab = zs.shape[0], min(zs.shape[1], zt.shape[1])
    c = choose_chunk_size(opts, n, vocab,
                          backend.workspace_bytes_per_logit(zs.dtype, zs.device.type),
                          zs.device.type)
    row_dtype = torch.float64 if zs.dtype == torch.float64 else torch.float32
    kd = torch.empty(n, dtype=row_dtype, device=zs.device)
    ce = torch.empty(n, dtype=row_dtype, device=zs.device) if spec.has_ce else None
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
        kd_c, ce_c = _chunk_rows(zs[start:stop, :vocab], zt[start:stop, :vocab], lab, opts,
                                 spec, backend, reducer, scale, out)
        kd[start:stop] = kd_c
        if ce is not None:
            ce[start:stop] = ce_c
    return kd, ce, grad
