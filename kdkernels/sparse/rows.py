"""The sparse teacher's side of a chunk: gather, mask, student-only row ops, tail math.

Per chunk of C kept rows with student logits ``zs`` [C, V_local] (a writable workspace):

1. gather the raw student logits at the row's teacher ids held here (and at its label);
2. mask those columns to -inf in ``zs``, so that the student-only stats pass sums the
   columns *outside* S: the student's mass outside S, log(1 - P), is then formed from its
   own sum, never as 1 - P (which cancels to noise for a confident student);
3. one reducer merge (one collective when vocab-parallel) of the stats and gathered values;
4. the tail's math on [C, K] in float64 (tails.py);
5. the student-only gradient pass writes alpha * p (and the CE terms) outside S, 0 at S;
   the values at S, computed in step 4 from the gathered logits, are added at the ids.
"""

from __future__ import annotations

import math

import torch

from .. import divergences
from ..layouts import SCOEF, SSTATS
from .plan import SparsePlan
from .tails import TailInputs, get, signed_log, signed_sum
from .teacher import SparseTeacher


def _add_at(x: torch.Tensor, col: torch.Tensor, vals: torch.Tensor) -> None:
    """x[i, col[i, k]] += vals[i, k]. On CPUs scatter_add_ copies x in and out whole when it
    is 16-bit or not contiguous (the packed dL/dz layout): 30x slower than index_put_,
    which writes through the strides, at [2048, 32000] bf16."""
    if x.is_contiguous() and x.dtype in (torch.float32, torch.float64):
        x.scatter_add_(1, col, vals)
        return
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(col)
    x.index_put_((rows, col), vals, accumulate=True)


def _neg_inf_where(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.full_like(x, -math.inf))


def _entropy(s: dict[str, torch.Tensor], lse: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """The tempered student's entropy over the full vocabulary, -sum p log p, from the stats
    of the columns outside S (which sum exp(a - m_a) (a - m_a) as e_a) and the log-probs ``lp``
    at S: outside, sum p log p = exp(m_a - lse) (e_a + (m_a - lse) s_a); no column outside S
    (s_a = 0, m_a = -inf) adds 0."""
    shift = s["m_a"] - lse
    out = torch.exp(shift) * (s["e_a"] + shift * s["s_a"])
    out = torch.where(s["s_a"] > 0, out, torch.zeros_like(out))
    inside = torch.where(torch.isneginf(lp), torch.zeros_like(lp), lp.exp() * lp).sum(1)
    return -(out + inside)


class SparseChunks:
    """ChunkRows (driver.py) of the sparse-teacher loss over kept rows."""

    def __init__(self, plan: SparsePlan, teacher: SparseTeacher,
                 lab: torch.Tensor | None) -> None:
        self.t, self.lab, self.opts, self.spec = teacher, lab, plan.opts, plan.spec
        self.backend, self.reducer = plan.backend, plan.reducer
        div = self.opts.effective_divergence
        self.rule = get(self.opts.tail).rules[div]
        self.params = self.opts.dense.divergence_params(divergences.get(div))

    def release(self) -> None:
        pass

    def __call__(self, start: int, stop: int, zs: torch.Tensor, dz: torch.Tensor | None,
                 scale: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        spec = self.spec
        width, k = zs.shape[1], self.t.ids.shape[1]
        ids, valid = self.t.ids[start:stop], self.t.valid[start:stop]
        local = ids - self.reducer.vocab_start
        here = valid & (local >= 0) & (local < width)
        col = torch.where(here, local, torch.zeros_like(local))
        acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
        gathered = torch.where(here, zs.gather(1, col).to(acc), 0.0)
        lab = None if self.lab is None or not spec.has_ce else self.lab[start:stop]
        parts = [None, gathered]
        # The gradient pass's label columns: -1 where the label is elsewhere or in S (the
        # values at S carry its onehot term).
        kernel_labels = torch.full((zs.shape[0],), -1, dtype=torch.int64, device=zs.device)
        in_s = None
        if lab is not None:
            lab_local = lab - self.reducer.vocab_start
            lab_here = (lab_local >= 0) & (lab_local < width)
            lab_col = torch.where(lab_here, lab_local, torch.zeros_like(lab_local))
            parts.append(torch.where(lab_here, zs.gather(1, lab_col[:, None])[:, 0].to(acc),
                                     0.0)[:, None])
            in_s = valid & (ids == lab[:, None])
            kernel_labels = torch.where(lab_here & ~in_s.any(1), lab_col, kernel_labels)
        _add_at(zs, col, torch.where(here, -math.inf, 0.0).to(zs.dtype))
        parts[0] = self.backend.student_stats(zs, spec).to(acc)
        merged = self.reducer.merge_student(torch.cat(parts, 1)).double()
        s = {name: merged[:, i] for i, name in enumerate(SSTATS)}
        # The gathered raw logits, scaled as the kernels scale what they load.
        z_s = merged[:, len(SSTATS): len(SSTATS) + k] * spec.student_scale
        cap = spec.student_softcap
        zc_s = z_s if cap is None else cap * torch.tanh(z_s / cap)
        a_s = _neg_inf_where(valid, zc_s * spec.inv_t)
        lse_out = s["m_a"] + torch.log(s["s_a"])
        lse_in = torch.logsumexp(a_s, 1)
        lse = torch.logaddexp(lse_out, lse_in)
        lp = _neg_inf_where(valid, a_s - lse[:, None])
        res = self.rule(TailInputs(
            lp, self.t.lq[start:stop], valid, lse_out - lse, self.t.log_r[start:stop],
            self.t.outside[start:stop]), self.params)
        ce = lse1 = zc_lab = None
        if lab is not None:
            z_lab = merged[:, -1] * spec.student_scale
            zc_lab = z_lab if cap is None else cap * torch.tanh(z_lab / cap)
            lse1 = lse
            if spec.ce_separate:
                lse1 = torch.logaddexp(s["m_z"] + torch.log(s["s_z"]),
                                       torch.logsumexp(_neg_inf_where(valid, zc_s), 1))
            ce = lse1 - zc_lab
        if dz is not None:
            self._gradient(zs, dz, scale.double(), res, a_s, zc_s, z_s, valid, here, col,
                           kernel_labels, in_s, s, lse, lse1)
        # Without want_entropy the stats hold no e_a: 0, as the dense rows report it.
        entropy = _entropy(s, lse, lp) if spec.want_entropy else torch.zeros_like(res.div)
        return res.div, ce, entropy

    def _gradient(self, zs, dz, scale, res, a_s, zc_s, z_s, valid, here, col, kernel_labels,
                  in_s, s, lse, lse1) -> None:
        spec, opts = self.spec, self.opts
        # dL/dx of the raw logit x = scale_s * dL/dz, and dL/dz = dL/da / T
        scale = scale * spec.student_scale
        kd_row = (opts.dense.soft_scale * spec.inv_t) * scale
        ce_row = opts.ce_weight * scale if spec.has_ce else torch.zeros_like(scale)
        # Outside S: dL/dz_j = kd_row * alpha * p_j (+ ce_row * p_j at T = 1), folded into
        # the normaliser as log|coefficient| with its sign. The row scale carries the
        # upstream gradient, which may be negative (reduction="none" with signed weights).
        log_kd, sign_kd = signed_log(kd_row)
        log_c, sign = log_kd + res.log_alpha, res.sign_alpha * sign_kd
        if spec.has_ce and not spec.ce_separate:
            log_c, sign = signed_sum(log_c, sign, *signed_log(ce_row))
        m_a = torch.maximum(s["m_a"], a_s.amax(1))
        kd_col = torch.where(torch.isneginf(log_c), 0.0, sign)
        named = dict(m_a=m_a, log_s_a=(lse - m_a) - log_c, kd=kd_col, ce=ce_row,
                     m_z=m_a, log_s_z=lse - m_a)
        if spec.ce_separate:
            m_z = torch.maximum(s["m_z"], _neg_inf_where(valid, zc_s).amax(1))
            named.update(m_z=m_z, log_s_z=lse1 - m_z)
        coef = torch.stack([named[name] for name in SCOEF], 1).float()
        self.backend.student_grad(zs, kernel_labels, coef, spec, dz)
        # At S: kd_row * g + ce_row * (softmax(z) - onehot), times the softcap derivative.
        vals = kd_row[:, None] * res.g
        if in_s is not None:
            e_z = torch.where(valid, torch.exp(zc_s - lse1[:, None]), 0.0)
            vals = vals + ce_row[:, None] * (e_z - in_s.double())
        if spec.student_softcap is not None:
            vals = vals * (1.0 - torch.tanh(z_s / spec.student_softcap) ** 2)
        _add_at(dz, col, torch.where(here, vals, 0.0).to(dz.dtype))


def logits_rows(zs: torch.Tensor, idx: torch.Tensor | None, chunk: int, rows: SparseChunks,
                row_scale: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The sparse loss over materialised student logits zs [N, V] at the kept rows (``idx``
    [kept], None: all): (kd [kept], ce [kept] | None, student entropy [kept],
    grad [N, V] | None). Each chunk is
    copied into one workspace (the masking writes to it), its gradient written in place."""
    n, vocab = zs.shape
    kept = rows.t.ids.shape[0]
    acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
    kd = torch.empty(kept, dtype=acc, device=zs.device)
    ce = torch.empty(kept, dtype=acc, device=zs.device) if rows.spec.has_ce else None
    entropy = torch.empty(kept, dtype=acc, device=zs.device)
    grad = None
    if row_scale is not None:
        grad = (torch.empty_like(zs, memory_format=torch.contiguous_format) if idx is None
                else torch.zeros(n, vocab, dtype=zs.dtype, device=zs.device))
    buf = torch.empty(min(chunk, max(kept, 1)), vocab, dtype=zs.dtype, device=zs.device)
    for start in range(0, kept, chunk):
        stop = min(kept, start + chunk)
        work = buf[: stop - start]
        if idx is None:
            work.copy_(zs[start:stop])
        else:
            torch.index_select(zs, 0, idx[start:stop], out=work)
        out = None if grad is None else work
        scale = None if row_scale is None else row_scale[start:stop]
        kd[start:stop], ce_c, entropy[start:stop] = rows(start, stop, work, out, scale)
        if ce is not None:
            ce[start:stop] = ce_c
        if grad is not None:
            if idx is None:
                grad[start:stop] = work
            else:
                grad.index_copy_(0, idx[start:stop], work)
    return kd, ce, entropy, grad
