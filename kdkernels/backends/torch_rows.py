"""The `torch` backend: the row-op contract as plain eager PyTorch ops over a chunk.

Runs on any device and in float64 (gradcheck). The chunk is walked in blocks of rows; each
block's math runs in a few preallocated scratch buffers with in-place / ``out=`` ops, so no
op allocates a [C, V] result. On CPUs a block's buffers are a few MiB: they stay in cache,
every pass but the exps costs little, and no fresh pages are faulted in per op (a newly
allocated 256 MiB temporary cost more than the exp written into it). Elsewhere a block is
normally the whole chunk (bench/README.md has the measurements, bench/row_ops.py takes
them).
"""

from __future__ import annotations

import math

import torch

from ..layouts import COEF, MIX, MIX_KINDS, NORMS, SCOEF, SSTATS, STATS, STATS_WEIGHTS
from .base import Backend, RowSpec

# zs and zt in storage, plus at most this many scratch buffers in the accumulation dtype,
# each [rows of a block, V] with a block no larger than the chunk (grad: z, log p, log q and
# one work buffer; mix: log p, log q, log-mixture, probabilities; stats: a, b, exp).
_TEMPS = 4
# Elements per scratch buffer: on CPUs 2 MiB of fp32, or 256 KiB per thread if more (blocks
# of a few rows stay in cache; a block of 1-2 rows pays per-op overhead instead); 256 MiB
# elsewhere, where per-op launch costs favour big blocks and the caching allocator makes
# buffers cheap.
_CPU_BLOCK_ELEMS = 1 << 19
_CPU_BLOCK_ELEMS_PER_THREAD = 1 << 16
_DEVICE_BLOCK_ELEMS = 1 << 26


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 math for every storage dtype; float64 stays float64 (gradcheck, oracle-grade runs).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _capped(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """x in the accumulation dtype, soft-capped (a fresh tensor unless nothing changes)."""
    x = x.to(_acc_dtype(x))
    if cap is None:
        return x
    return torch.tanh(x / cap).mul_(cap)


class _Blocks:
    """Row blocks of a [C, V] chunk and `k` scratch buffers sized for the largest block."""

    def __init__(self, x: torch.Tensor, k: int) -> None:
        c, v = x.shape
        elems = _DEVICE_BLOCK_ELEMS
        if x.device.type == "cpu":
            elems = max(_CPU_BLOCK_ELEMS, torch.get_num_threads() * _CPU_BLOCK_ELEMS_PER_THREAD)
        self.rows = max(1, min(c, elems // max(1, v)))
        self.c = c
        self.scratch = torch.empty(k, min(self.rows, c), v, dtype=_acc_dtype(x), device=x.device)

    def __iter__(self):
        for r0 in range(0, self.c, self.rows):
            r1 = min(self.c, r0 + self.rows)
            yield slice(r0, r1), [buf[: r1 - r0] for buf in self.scratch]


def _prepare(x: torch.Tensor, cap: float | None, inv_t: float | None,
             buf: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """tempered(capped(scaled(x))) in the accumulation dtype: x itself when nothing changes it
    (then it must not be written to), else written into buf (``_capped(x * scale) * inv_t``,
    as every backend forms it). ``inv_t`` None: untempered (RowSpec decides T == 1);
    ``scale`` None: a logit scale of 1."""
    src = x
    if x.dtype != buf.dtype:
        src = buf.copy_(x)
    if scale is not None:
        src = torch.mul(src, scale, out=buf)
    if cap is not None:
        src = torch.div(src, cap, out=buf).tanh_().mul_(cap)
    if inv_t is not None:
        src = torch.mul(src, inv_t, out=buf)
    return src


def _inv_t(spec: RowSpec) -> float | None:
    return spec.inv_t if spec.tempered else None


def _scales(spec: RowSpec) -> tuple[float | None, float | None]:
    """The (student, teacher) logit scales, None where a scale is 1 (no pass over x)."""
    return tuple(None if spec.const(k) == 1.0 else spec.const(k) for k in ("scale_s", "scale_t"))


def _row_max_exp(x: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max m and exp(x - m) in buf (a row of -inf gives NaN, as it should)."""
    m = x.amax(1)
    return m, torch.sub(x, m[:, None], out=buf).exp_()


def _xexp_sum(x: torch.Tensor, m: torch.Tensor, e: torch.Tensor,
              buf: torch.Tensor) -> torch.Tensor:
    """Row sums of e * (x - m) for e = exp(x - m), via buf. The log is clamped at -FLT_MAX,
    as csrc/row_math.h xexp_term does, so that a -inf logit adds e * -FLT_MAX = 0 (not
    0 * -inf = NaN) while a NaN logit stays NaN."""
    finfo = torch.finfo(buf.dtype)
    return torch.sub(x, m[:, None], out=buf).clamp_(min=finfo.min).mul_(e).sum(1)


def _label_logit(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    here = labels >= 0
    picked = z.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(here, picked, torch.zeros_like(picked))


def stats(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    out = torch.zeros(zs.shape[0], len(STATS), dtype=_acc_dtype(zs), device=zs.device)
    inv_t, weight = _inv_t(spec), int(spec.const("stats_weight"))
    separate_z = spec.ce_separate
    scale_s, scale_t = _scales(spec)
    for rows, (buf_a, buf_b, buf_e) in _Blocks(zs, 3):
        o = out[rows]
        # z: the untempered capped student; a = z / T.
        z = _prepare(zs[rows], spec.student_softcap, None if separate_z else inv_t, buf_a,
                     scale_s)
        if spec.has_ce:
            o[:, STATS.z_label] = _label_logit(z, labels[rows])
        if separate_z:
            m_z, e = _row_max_exp(z, buf_e)
            o[:, STATS.m_z], o[:, STATS.s_z] = m_z, e.sum(1)
            a = torch.mul(z, inv_t, out=buf_a)
        else:
            a = z
        m_a, e = _row_max_exp(a, buf_e)
        o[:, STATS.m_a], o[:, STATS.s_a] = m_a, e.sum(1)
        if spec.want_entropy:  # else e_a stays 0 (base.py)
            o[:, STATS.e_a] = _xexp_sum(a, m_a, e, buf_b)  # buf_b is free until b
        if not separate_z:
            o[:, STATS.m_z], o[:, STATS.s_z] = o[:, STATS.m_a], o[:, STATS.s_a]
        b = _prepare(zt[rows], spec.teacher_softcap, inv_t, buf_b, scale_t)
        if weight == STATS_WEIGHTS.student:  # a - b into a's buffer (a is no longer needed)
            o[:, STATS.w_a] = torch.sub(a, b, out=buf_a).mul_(e).sum(1)
        m_b, e = _row_max_exp(b, buf_e)
        o[:, STATS.m_b], o[:, STATS.s_b] = m_b, e.sum(1)
        if weight == STATS_WEIGHTS.teacher:
            o[:, STATS.w_b] = torch.sub(b, a, out=buf_b if b is buf_b else buf_a).mul_(e).sum(1)
    return out


def _log_prob(x: torch.Tensor, cap: float | None, inv_t: float | None, m: torch.Tensor,
              log_s: torch.Tensor, buf: torch.Tensor, scale: float | None) -> torch.Tensor:
    """log-probs into buf as (x - m) - log_s: see base.py for why not x - lse."""
    src = _prepare(x, cap, inv_t, buf, scale)
    return torch.sub(src, m[:, None], out=buf).sub_(log_s[:, None])


def _log_mix_into(logq: torch.Tensor, logp: torch.Tensor, spec: RowSpec,
                  buf: torch.Tensor) -> torch.Tensor:
    """log(w_q * q + (1 - w_q) * p) into buf as a logaddexp of log-probs (exact when a weight
    is 0). The weight of q is added after the logaddexp, so no buffer holds log q + log w_q."""
    kind = int(spec.const("mix_kind"))
    if kind == MIX_KINDS.only_p:
        return buf.copy_(logp)
    if kind == MIX_KINDS.only_q:
        return buf.copy_(logq)
    lw_q, lw_p = spec.const("log_w_q"), spec.const("log_w_p")
    torch.add(logp, lw_p - lw_q, out=buf)
    return torch.logaddexp(logq, buf, out=buf).add_(lw_q)


def _log_geometric_into(logq: torch.Tensor, logp: torch.Tensor, w_q: float,
                        buf: torch.Tensor) -> torch.Tensor:
    """log(q^w_q p^(1 - w_q)) into buf as log p + w_q (log q - log p): exactly log p where
    q = p. Where p = 0 the term is 0 whatever q is (-inf + inf would be NaN); NaN stays."""
    lw = torch.sub(logq, logp, out=buf).mul_(w_q).add_(logp)
    return lw.masked_fill_(torch.isneginf(logp) & ~torch.isnan(logq), -math.inf)


def _masked_row_sum(prod: torch.Tensor, w: torch.Tensor, logm: torch.Tensor) -> torch.Tensor:
    """Row sums of prod = w * (log w - logm), with 0 where w == 0 (an underflowed
    probability, whose log-ratio may be infinite); NaN stays NaN. With 0 <= w <= 1 and
    logm < inf, a term is not finite only where w == 0 (0 * inf = NaN) or where w or logm
    is NaN, so a row whose plain sum is not finite sums without its NaNs unless w or logm
    holds one: no [C, V] temporary."""
    s = prod.sum(1)
    bad = ~torch.isfinite(s)
    if bool(bad.any()):
        genuine = torch.isnan(w.sum(1)) | torch.isnan(logm.sum(1))
        fixed = torch.where(genuine, torch.full_like(s, math.nan), torch.nansum(prod, 1))
        s = torch.where(bad, fixed, s)
    return s


def mix(zs: torch.Tensor, zt: torch.Tensor, norms: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    div = spec.divergence
    if not spec.needs_mix:
        raise ValueError(f"mix pass is not defined for divergence {div!r}")
    out = torch.empty(zs.shape[0], len(MIX), dtype=_acc_dtype(zs), device=zs.device)
    inv_t, w_q = _inv_t(spec), spec.const("w_q")
    scale_s, scale_t = _scales(spec)
    c0, c1 = MIX.c0, MIX.c1
    for rows, (buf_p, buf_q, buf_m, buf_e) in _Blocks(zs, 4):
        nrm, o = norms[rows], out[rows]
        logp = _log_prob(zs[rows], spec.student_softcap, inv_t, nrm[:, NORMS.m_a],
                         nrm[:, NORMS.log_s_a], buf_p, scale_s)
        logq = _log_prob(zt[rows], spec.teacher_softcap, inv_t, nrm[:, NORMS.m_b],
                         nrm[:, NORMS.log_s_b], buf_q, scale_t)
        if div == "jsd":
            logm = _log_mix_into(logq, logp, spec, buf_m)
            q = torch.exp(logq, out=buf_e)
            o[:, c0] = _masked_row_sum(logq.sub_(logm).mul_(q), q, logm)
            p = torch.exp(logp, out=buf_e)
            o[:, c1] = _masked_row_sum(logp.sub_(logm).mul_(p), p, logm)
        elif div == "skew_forward_kl":
            logm = _log_mix_into(logq, logp, spec, buf_m)
            # p * q / mix as one exp: q / mix alone overflows where p underflows (0 * inf).
            o[:, c1] = torch.add(logq, logp, out=buf_e).sub_(logm).exp_().sum(1)
            q = torch.exp(logq, out=buf_e)
            o[:, c0] = _masked_row_sum(logq.sub_(logm).mul_(q), q, logm)
        elif div == "skew_reverse_kl":
            logm = _log_mix_into(logq, logp, spec, buf_m)
            # skew p^2 / mix <= p as one exp; at skew 0 the term is absent (p / q may overflow).
            if int(spec.const("mix_kind")) != MIX_KINDS.only_q:
                o[:, c1] = (torch.mul(logp, 2, out=buf_e).add_(spec.const("log_w_p"))
                            .sub_(logm).exp_().sum(1))
            else:
                o[:, c1] = 0.0
            p = torch.exp(logp, out=buf_e)
            o[:, c0] = _masked_row_sum(logp.sub_(logm).mul_(p), p, logm)
        elif div == "tvd":  # |d| as d * sign(d), so no buffer holds |d|
            p, q = logp.exp_(), logq.exp_()
            d = torch.sub(p, q, out=buf_m)
            sign = torch.sign(d, out=buf_e)
            o[:, c0] = d.mul_(sign).sum(1).mul_(0.5)
            o[:, c1] = p.mul_(sign).sum(1).mul_(0.5)
        elif div == "alpha":
            w = _log_geometric_into(logq, logp, w_q, buf_m).exp_()
            o[:, c1] = w.sum(1)
            p, q = logp.exp_(), logq.exp_()
            # p + alpha (q - p) - w >= 0 term by term (weighted AM-GM), exactly 0 where q = p
            o[:, c0] = torch.sub(q, p, out=buf_e).mul_(w_q).add_(p).sub_(w).sum(1)
        else:
            raise ValueError(f"the torch backend has no mix pass for divergence {div!r}")
    return out


def _alpha_w_minus_p_into(logq, logp, w_q: float, work) -> torch.Tensor:
    """w - p of the alpha divergence into ``work``, without cancellation: p expm1(alpha
    (log q - log p)) where that exponent is below 1 in magnitude (exactly 0 at q = p), else
    exp(log w) - p (expm1 of a large exponent overflows where p underflows). Leaves p in
    ``logp``; ``logq`` is clobbered."""
    _log_geometric_into(logq, logp, w_q, work).exp_()  # w
    x = logq.sub_(logp).mul_(w_q)
    near = x.abs() < 1.0  # a bool [C, V]: a quarter of a chunk buffer
    p = logp.exp_()
    work.sub_(p)
    near_val = x.masked_fill_(~near, 0.0).expm1_().mul_(p)
    return torch.where(near, near_val, work, out=work)


def _soft_dz(logp, logq, c, ce_p, spec: RowSpec, work) -> torch.Tensor:
    """kd_coef * G (G of the contract, base.py) + ce_p * p into `work`, for every divergence
    but forward_kl. ce_p is the CE coefficient when softmax(z) is p, else None. G is
    p * s (D - aux) (+ a term free of p) for a log-ratio D, so kd, aux and the CE term are
    applied to D by cheap in-place row-constant ops before the one multiplication by p."""
    div = spec.divergence
    kd, aux = c[:, COEF.kd, None], c[:, COEF.aux, None]
    k_div = spec.const("k_div")
    if div == "skew_forward_kl":  # G = k_div * (x - p * aux)
        logm = _log_mix_into(logq, logp, spec, work)
        # p * q / mix as one exp: q / mix alone overflows where p underflows (0 * inf).
        x = logq.add_(logp).sub_(logm).exp_()
        k = kd * k_div
        return torch.mul(x, k, out=work).addcmul_(
            logp.exp_(), -k * aux if ce_p is None else ce_p - k * aux)
    if div == "alpha":  # G = k_div * ((w - p) + p * aux), aux = c0 = 1 - sum w
        x = _alpha_w_minus_p_into(logq, logp, spec.const("w_q"), work)
        k = kd * k_div
        return x.mul_(k).addcmul_(logp, k * aux if ce_p is None else ce_p + k * aux)
    second = None
    if div == "reverse_kl":
        d, k = torch.sub(logp, logq, out=logq).sub_(aux), kd
    elif div == "jsd":
        logm = _log_mix_into(logq, logp, spec, work)
        d, k = torch.sub(logp, logm, out=work).sub_(aux), kd * k_div
    elif div == "skew_reverse_kl":
        logm = _log_mix_into(logq, logp, spec, work)
        if int(spec.const("mix_kind")) != MIX_KINDS.only_q:
            # skew p^2 / mix <= p as one exp; at skew 0 the term is absent
            second = (torch.mul(logp, 2, out=logq).add_(spec.const("log_w_p")).sub_(logm)
                      .exp_())
        d, k = torch.sub(logp, logm, out=work).sub_(aux), kd
    elif div == "tvd":
        # (0.5 sign - aux) as 0.5 (sign - 2 aux): scaling by 2 and 0.5 is exact.
        p = logp.exp_()
        d = torch.sub(p, logq.exp_(), out=logq).sign_().sub_(aux * 2.0)
        k = kd * 0.5
    else:
        raise ValueError(f"the torch backend has no gradient for divergence {div!r}")
    d.mul_(k)
    if ce_p is not None:
        d.add_(ce_p)
    dz = torch.mul(d, logp if div == "tvd" else logp.exp_(), out=work)
    return dz if second is None else dz.addcmul_(second, kd, value=-1.0)


def _columns(c: torch.Tensor):
    """col(name): the [rows, 1] coefficient column ``name`` of layouts.COEF."""
    return lambda name: c[:, getattr(COEF, name), None]


def grad(zs, zt, labels, coef, spec: RowSpec, out) -> None:
    inv_t, cap = _inv_t(spec), spec.student_softcap
    # At T = 1, z == a, so softmax(z) = p * exp((m_a - m_z) + (log_s_a - log_s_z)), a row
    # factor (exactly 1 when the stats agree): the CE term joins the p term instead of
    # costing a third exp, and no host sync decides it.
    ce_is_p = spec.has_ce and not spec.tempered
    keep_z = cap is not None or spec.ce_separate
    scale_s, scale_t = _scales(spec)
    # Rows of ignored tokens get exact zeros whatever their logits held.
    dead = ((coef[:, COEF.kd] == 0) & (coef[:, COEF.ce] == 0))[:, None]
    direct = out.dtype == _acc_dtype(zs)  # else dz is formed in scratch and cast into out
    for rows, (buf_z, buf_p, buf_q, buf_w) in _Blocks(zs, 4):
        c, o = coef[rows].to(buf_p.dtype), out[rows]
        z = None
        if keep_z:  # a copy even when zs needs no conversion: out may alias zs
            z = _prepare(zs[rows], cap, None, buf_z, scale_s)
            z = z if z is buf_z else buf_z.copy_(z)
        if z is None:
            a = _prepare(zs[rows], cap, inv_t, buf_p, scale_s)
        else:
            a = _prepare(z, None, inv_t, buf_p)
        b = _prepare(zt[rows], spec.teacher_softcap, inv_t, buf_q, scale_t)
        col = _columns(c)
        ce = col("ce")
        ce_p = None
        if ce_is_p:
            ce_p = ce * torch.exp((col("m_a") - col("m_z")) + (col("log_s_a") - col("log_s_z")))
        # From here on zs[rows] is not read, so dz may be written straight into out.
        if spec.divergence == "forward_kl":
            # p - q needs no log-probs: exp(x - m) times a row factor that also carries 1 / s,
            # kd and ce_p (more precise than exp((x - m) - log_s), and two passes fewer).
            e_p = torch.sub(a, col("m_a"), out=buf_p).exp_()
            e_q = torch.sub(b, col("m_b"), out=buf_q).exp_()
            kd = col("kd")
            kp = kd if ce_p is None else kd + ce_p
            dz = torch.mul(e_p, kp * torch.exp(-col("log_s_a")), out=o if direct else e_p)
            dz.addcmul_(e_q, kd * torch.exp(-col("log_s_b")), value=-1.0)
        else:
            logp = torch.sub(a, col("m_a"), out=buf_p).sub_(col("log_s_a"))
            logq = torch.sub(b, col("m_b"), out=buf_q).sub_(col("log_s_b"))
            dz = _soft_dz(logp, logq, c, ce_p, spec, o if direct else buf_w)
        if spec.has_ce:
            if not ce_is_p:  # softmax(z) as exp(z - m_z) / s_z, the 1 / s_z in the row factor
                e_z = torch.sub(z, col("m_z"), out=buf_q).exp_()
                dz.addcmul_(e_z, ce * torch.exp(-col("log_s_z")))
            lab = labels[rows]
            # -ce at the label column; rows without one get -0.0 at column 0 (x + -0 == x).
            dz.scatter_add_(1, lab.clamp(min=0)[:, None],
                            torch.where(lab[:, None] >= 0, -ce, torch.full_like(ce, -0.0)))
        if cap is not None:
            dz.mul_(z.div_(cap).square_().neg_().add_(1.0))
        dz.masked_fill_(dead[rows], 0.0)  # on the block while it is in cache
        if not direct:
            o.copy_(dz)


def _masked_student(x: torch.Tensor, spec: RowSpec, buf: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(capped scaled z in buf, mask of the masked columns): a raw -inf stays -inf
    (base.py)."""
    masked = torch.isneginf(x)
    z = buf.copy_(x)
    cap, scale = spec.student_softcap, _scales(spec)[0]
    if scale is not None:
        z.mul_(scale)
    if cap is not None:
        torch.div(z, cap, out=z).tanh_().mul_(cap).masked_fill_(masked, -math.inf)
    return z, masked


def _max_sum(x: torch.Tensor, buf: torch.Tensor, buf_d: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, ...]:
    """Row max and sum exp(x - max), and with ``buf_d`` sum exp(x - max) (x - max); a row of
    -inf gives (-inf, 0, 0)."""
    m = x.amax(1)
    safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.sub(x, safe[:, None], out=buf).exp_()
    if buf_d is None:
        return m, e.sum(1)
    return m, e.sum(1), _xexp_sum(x, safe, e, buf_d)


def student_stats(zs: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    out = torch.empty(zs.shape[0], len(SSTATS), dtype=_acc_dtype(zs), device=zs.device)
    for rows, (buf_z, buf_e, buf_d) in _Blocks(zs, 3):
        o = out[rows]
        z, _ = _masked_student(zs[rows], spec, buf_z)
        if spec.ce_separate:
            o[:, SSTATS.m_z], o[:, SSTATS.s_z] = _max_sum(z, buf_e)
        a = z.mul_(spec.inv_t) if spec.tempered else z
        if spec.want_entropy:
            o[:, SSTATS.m_a], o[:, SSTATS.s_a], o[:, SSTATS.e_a] = _max_sum(a, buf_e, buf_d)
        else:
            o[:, SSTATS.m_a], o[:, SSTATS.s_a] = _max_sum(a, buf_e)
            o[:, SSTATS.e_a] = 0.0
        if not spec.ce_separate:
            o[:, SSTATS.m_z], o[:, SSTATS.s_z] = o[:, SSTATS.m_a], o[:, SSTATS.s_a]
    return out


def _scaled_softmax(x: torch.Tensor, m: torch.Tensor, log_s: torch.Tensor, k: torch.Tensor,
                    buf: torch.Tensor) -> torch.Tensor:
    """k * exp((x - m) - log_s) into buf, exactly 0 in rows with k == 0."""
    t = torch.sub(x, m, out=buf).sub_(log_s).exp_().mul_(k)
    return t.masked_fill_(k == 0, 0.0)


def student_grad(zs, labels, coef, spec: RowSpec, out) -> None:
    cap = spec.student_softcap
    for rows, (buf_z, buf_a, buf_w) in _Blocks(zs, 3):
        c = coef[rows].to(buf_z.dtype)
        col = lambda name, c=c: c[:, getattr(SCOEF, name), None]  # noqa: E731
        z, masked = _masked_student(zs[rows], spec, buf_z)
        # zs[rows] is not read from here on: out may alias it.
        a = torch.mul(z, spec.inv_t, out=buf_a) if spec.tempered else z
        dz = _scaled_softmax(a, col("m_a"), col("log_s_a"), col("kd"), buf_w)
        if spec.has_ce:
            ce = col("ce")
            if spec.ce_separate:
                dz.add_(_scaled_softmax(z, col("m_z"), col("log_s_z"), ce, buf_a))
            lab = labels[rows]
            dz.scatter_add_(1, lab.clamp(min=0)[:, None],
                            torch.where(lab[:, None] >= 0, -ce, torch.full_like(ce, -0.0)))
        if cap is not None:
            dz.mul_(z.div_(cap).square_().neg_().add_(1.0))
        out[rows] = dz.masked_fill_(masked, 0.0)


def not_supported_reasons(device: torch.device, dtype: torch.dtype, spec: RowSpec) -> list[str]:
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return [f"torch backend needs float32/float64/bfloat16/float16 logits, got {dtype}"]
    return []


def workspace_bytes_per_logit(dtype: torch.dtype, device_type: str = "cuda") -> int:
    inputs = 2 * torch.empty((), dtype=dtype).element_size()
    if device_type == "cpu":  # scratch of a fixed few MiB (_CPU_BLOCK_ELEMS), not per row
        return inputs
    return inputs + (8 if dtype == torch.float64 else 4) * _TEMPS


BACKEND = Backend(
    name="torch",
    stats=stats,
    mix=mix,
    grad=grad,
    not_supported_reasons=not_supported_reasons,
    workspace_bytes_per_logit=workspace_bytes_per_logit,
    student_stats=student_stats,
    student_grad=student_grad,
)
