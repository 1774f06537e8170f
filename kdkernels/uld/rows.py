"""The per-chunk row math of the fused ULD / GOLD-hybrid loss (``fused.py``), per backend.

Every function works on a chunk of C rows held in preallocated workspace buffers (fp32, or
float64 for float64 inputs) and writes its results in place; none allocates a [C, V]
temporary of its own beyond what ``Workspace`` accounts for, and nothing here ever sees more
than a chunk of rows.

The sorted L1 (``sorted_l1``) is the one step with a backend choice:

* ``torch`` (CPU and CUDA): ``torch.sort`` of the chunk (values and int64 indices of both
  sides, in the workspace), or ``torch.topk`` for the top-k variant. On CUDA this is torch's
  segmented sort on the chunk: no Triton sort is written.
* ``cpp`` (CPU): ``kdkernels_uld::sorted_l1`` (csrc/uld_cpu.cpp, built by ``_cpp.py``), a
  per-row LSD radix sort of (value, index) pairs in a per-thread scratch, parallel over rows
  with at::parallel_for; it needs no [C, V] sort buffers.

Gradient of the sorted L1 without sorted copies (shared/DESIGN.md "Cross-tokenizer
distillation"): with P_j at rank r(j) of its sorted row, ``dL/dP_j = sign(P_j - Q_sorted[r(j)])``
(0 where equal; ranks past the teacher's width compare with 0). The merge scale c > 0 keeps the
order, so the unscaled rows are sorted and c enters the differences.

Ties (exact in bf16 logits, whose values repeat) make the rank of a value, and so its sign,
a choice among equally valid subgradients: both backends sort stably, ranking tied values by
column index, so that they agree with each other.

Top-k variant (``k``): ``sum_{r<K} |P_r - Q_r| + |tail_P - tail_Q|``, tail = the row's mass
outside its K largest values. It is a lower bound of the full sorted L1 (the ranks past K
contribute ``sum |P_r - Q_r| >= |sum P_r - sum Q_r|``), exact when the differences past rank K
share a sign, and equal to it when K covers both rows. Its gradient: the rank signs on the
top-K entries, ``sign(tail_P - tail_Q)`` on every other entry.
"""

from __future__ import annotations

import torch

CLAMP = 1e-8  # TRL clamps the merge scalars and the JSD's probabilities at this value
# Tests set this to fill every workspace buffer with NaN (ints with -1) on allocation: a
# value read before it is written then shows in the results.
POISON = False
_IDX = 8  # bytes of an int64 index


def sort_bytes_per_row(impl: str, widths: tuple[int, ...], k: int | None, elem: int) -> int:
    """Workspace bytes per chunk row of ``sorted_l1`` over rows of these widths (both sides)."""
    if impl == "cpp":
        return 0  # per-thread scratch only
    return sum((elem + _IDX) * (w if k is None else min(k, w)) for w in widths)


class Workspace:
    """Named [rows, width] buffers allocated once per call and reused by every chunk (a view
    of the first c rows per chunk); ``release`` frees them all even if views survive."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows, self.device = rows, device
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, c: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None:
            if POISON:
                fill = float("nan") if dtype.is_floating_point else (
                    True if dtype == torch.bool else -1)
                buf = torch.full((self.rows, width), fill, dtype=dtype, device=self.device)
            else:
                buf = torch.empty(self.rows, width, dtype=dtype, device=self.device)
            self._bufs[name] = buf
        assert buf.shape[1] == width and buf.dtype == dtype, name
        return buf[:c]

    def release(self) -> None:
        for buf in self._bufs.values():
            buf.untyped_storage().resize_(0)
        self._bufs.clear()


# ----------------------------------------------------------------------------- row stats


def softmax_(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """z [C, V] -> softmax(z / T) in place; returns the log-sum-exp of z / T per row [C].
    No [C, V] temporary (torch.logsumexp would allocate two)."""
    if temperature != 1.0:
        z.div_(temperature)
    m = z.amax(dim=1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z.sub_(m[:, None]).exp_()
    s = z.sum(dim=1)
    z.div_(s[:, None])
    return m + s.log()


def lse_(z: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp of z [C, V] per row; z is clobbered (left as exp(z - max))."""
    m = z.amax(dim=1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z.sub_(m[:, None]).exp_()
    return m + z.sum(dim=1).log()


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a[i, j] b[i, j] per row, without an [C, V] product temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


# ----------------------------------------------------------------------------- sorted L1


def sorted_l1(x: torch.Tensor, cx: torch.Tensor, y: torch.Tensor, cy: torch.Tensor,
              out: torch.Tensor, k: int | None, impl: str, ws: Workspace | None,
              tag: str = "") -> torch.Tensor:
    """Per row i: ``sum_r |cx_i sort(x_i)_r - cy_i sort(y_i)_r|`` over descending sorts, the
    narrower side zero-padded (or its top-k variant, ``k``). x [C, W1] (kept), y [C, W2]
    (clobbered), non-negative; cx, cy [C] > 0. ``out`` [C, W1] receives dL/d(cx x) for unit
    row weights (in x's column order); it is also the scratch of the top-k tails."""
    if impl == "cpp":
        return torch.ops.kdkernels_uld.sorted_l1(x, cx.contiguous(), y, cy.contiguous(), out,
                                                 0 if k is None else k)
    return _sorted_l1_torch(x, cx, y, cy, out, k, ws, tag)


def _sorted_l1_torch(x, cx, y, cy, out, k, ws, tag):
    c, w1 = x.shape
    w2 = y.shape[1]
    dt = x.dtype
    if k is None:
        k1, k2 = w1, w2
    else:
        k1, k2 = min(k, w1), min(k, w2)
    xs = ws.get(tag + "xs", c, k1, dt)
    xi = ws.get(tag + "xi", c, k1, torch.int64)
    ys = ws.get(tag + "ys", c, k2, dt)
    yi = ws.get(tag + "yi", c, k2, torch.int64)
    if k is None:
        torch.sort(x, dim=1, descending=True, stable=True, out=(xs, xi))
        torch.sort(y, dim=1, descending=True, stable=True, out=(ys, yi))
        tail = None
    else:
        torch.topk(x, k1, dim=1, out=(xs, xi))
        torch.topk(y, k2, dim=1, out=(ys, yi))
        # tails summed over the entries outside the top k (no cancellation against 1)
        out.copy_(x).scatter_(1, xi, 0.0)
        y.scatter_(1, yi, 0.0)
        tail = cx * out.sum(dim=1) - cy * y.sum(dim=1)
    m = min(k1, k2)
    ys.mul_(cy[:, None])
    xs.mul_(cx[:, None])
    xs[:, :m].sub_(ys[:, :m])  # the rank differences; past the teacher's width, vs 0
    loss = torch.linalg.vector_norm(xs, 1, dim=1)
    if k2 > m:
        loss += ys[:, m:].sum(dim=1)  # the student's zero padding: |0 - Q_r|
    if tail is not None:
        loss += tail.abs()
        out.copy_(tail.sign()[:, None].expand_as(out))
    xs.sign_()
    out.scatter_(1, xi, xs)
    return loss


# ----------------------------------------------------------------------------- hybrid JSD


def hybrid(x: torch.Tensor, cx: torch.Tensor, y: torch.Tensor, cy: torch.Tensor, cfg,
           out: torch.Tensor, want_grad: bool, ws: Workspace) -> torch.Tensor:
    """GOLD's hybrid per row: ``cfg.mw`` x the generalized JSD(``cfg.beta``) of the matched
    columns (``cfg.s_matched`` / ``cfg.t_matched``) of the merged rows (cx x, cy y) plus
    ``cfg.uw`` x the sorted L1 (top-k: ``cfg.top_k``) of the free columns. x [C, Vs] and
    y [C, Vt] are kept; with ``want_grad`` ``out`` [C, Vs] receives dL/d(cx x) in every column
    (repeated matched ids add). ``cfg.impl == "cpp"``: one C++ pass per row that gathers the
    columns itself; torch: gathered [C, M] / [C, F] buffers from ``ws`` and scatters back."""
    k = cfg.top_k
    if cfg.impl == "cpp":
        return torch.ops.kdkernels_uld.hybrid(
            x, cx.contiguous(), y, cy.contiguous(), cfg.s_matched, cfg.t_matched, cfg.s_free,
            cfg.t_free, out, float(cfg.mw), float(cfg.uw), float(cfg.beta),
            0 if k is None else k, want_grad)
    c, dt = x.shape[0], x.dtype
    n_m, n_sf, n_tf = cfg.s_matched.numel(), cfg.s_free.numel(), cfg.t_free.numel()
    loss = torch.zeros(c, dtype=dt, device=x.device)
    out.zero_()
    if n_m and cfg.mw != 0:
        pm = torch.index_select(x, 1, cfg.s_matched, out=ws.get("pm", c, n_m, dt))
        qm = torch.index_select(y, 1, cfg.t_matched, out=ws.get("qm", c, n_m, dt))
        pm.mul_(cx[:, None])
        qm.mul_(cy[:, None])
        loss += cfg.mw * gjsd_(pm, qm, cfg.beta, ws, want_grad)
        if want_grad:
            out.index_add_(1, cfg.s_matched, pm, alpha=cfg.mw)
    if n_sf and n_tf and cfg.uw != 0:
        xu = torch.index_select(x, 1, cfg.s_free, out=ws.get("xu", c, n_sf, dt))
        yu = torch.index_select(y, 1, cfg.t_free, out=ws.get("yu", c, n_tf, dt))
        gu = ws.get("gu", c, n_sf, dt)
        loss += cfg.uw * sorted_l1(xu, cx, yu, cy, gu, k, "torch", ws, "u")
        if want_grad:
            out.index_add_(1, cfg.s_free, gu, alpha=cfg.uw)
    return loss


def gjsd_(pm: torch.Tensor, qm: torch.Tensor, beta: float, ws: Workspace,
          want_grad: bool) -> torch.Tensor:
    """GOLD's generalized JSD(beta) on raw (unnormalised) probabilities, summed per row:
    ``generalized_jsd_loss(logits_are_probs=True)`` of TRL, whose logs are of the values
    clamped at 1e-8. pm, qm [C, M] are clobbered; with ``want_grad`` pm receives dL/dpm
    (0 where the clamp is active)."""
    c, width = pm.shape
    dt = pm.dtype
    keep = None
    if want_grad:
        keep = ws.get("jsd_keep", c, width, torch.bool)
        torch.ge(pm, CLAMP, out=keep)
    s, t = pm.clamp_min_(CLAMP), qm.clamp_min_(CLAMP)
    ls = torch.log(s, out=ws.get("jsd_ls", c, width, dt))
    lt = torch.log(t, out=ws.get("jsd_lt", c, width, dt))
    if beta == 0.0:  # KL(t || s)
        lt.sub_(ls)
        loss = rowdot(t, lt)
        if want_grad:
            torch.div(t, s, out=ls).neg_()
            pm.copy_(ls)
    elif beta == 1.0:  # KL(s || t)
        ls.sub_(lt)
        loss = rowdot(s, ls)
        if want_grad:
            pm.copy_(ls.add_(1.0))
    else:
        lm = ws.get("jsd_lm", c, width, dt)
        torch.mul(s, 1.0 - beta, out=lm).add_(t, alpha=beta).log_()
        lt.sub_(lm)
        ls.sub_(lm)
        loss = beta * rowdot(t, lt) + (1.0 - beta) * rowdot(s, ls)
        if want_grad:
            pm.copy_(ls).mul_(1.0 - beta)
    if want_grad:
        pm.mul_(keep)
    return loss


def jsd_bytes_per_row(width: int, elem: int) -> int:
    # pm, qm (the gathered columns), keep mask, log s, log t, log m
    return width * (5 * elem + 1)
