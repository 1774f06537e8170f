"""``fused_linear_uld_loss``: ULD / GOLD's hybrid loss from hidden states and LM heads, chunked
over aligned groups, never materialising the [tokens x vocab] logits.

Same contract and semantics as ``uld_loss`` (``logits.py``, TRL 1.16's ``ULDLoss``) with
``logits = hidden @ weight.T + bias``. The gradient is computed in forward (the loss is
terminal); backward scales it by grad_output (``reduction="none"`` re-runs the passes with
grad_output as per-sample weights). Three passes, each a loop over chunks of rows whose
buffers are allocated once per call (``rows.Workspace``) from ``max_workspace_bytes``:

1. **stats**, over the student's merge-scalar rows (and its CE rows that are no group's base
   row) and the teacher's merge-scalar rows: logits GEMM, fp32 log-sum-exp and the token's
   logit -> ``log p[row, token]`` (clamped at log 1e-8, as TRL clamps p), summed per group
   into the merge scales ``c``; the CE of those rows (``lse - z[label]``).
2. **groups**: per chunk of aligned groups, both sides' base rows from the hidden states
   (``softmax(z / T)`` in fp32), the merge scale, the sorted L1 (``torch.sort`` of the chunk, or
   the C++ radix sort: ``rows.py``) or the hybrid (matched columns: GOLD's generalized JSD on
   raw merged probabilities; unmatched: sorted L1), and in the same pass dL/dP -> dL/dz
   (``dL/dz = p (cw g - sum p cw g) / T``) and ``dL/dc = sum_j g_j p_j``; the CE of base rows
   that are CE rows rides along (its ``softmax - onehot`` gradient added to the same dz).
   Gradient GEMMs: grad_hidden rows (index_add), grad_weight, grad_bias.
3. **scalars** (gradient only), over the rows of pass 1: the CE-like gradient of each merge
   scalar, ``dL/dz = (dL/dc_g c_g) (onehot(token) - p) / T`` (0 where the clamp is active),
   plus the CE gradient of the rows' own labels, and their gradient GEMMs.

The CE term (``ce_weight > 0``) thus needs no GEMM of its own: its rows are base rows
(pass 2) or pass-1/3 rows. The teacher never gets a gradient (its tensors may require grad:
they get None). Workspace per chunk row: fp32 student and teacher rows and dL/dP, the sort
buffers (values + int64 indices, both sides; none for the C++ sort), the hybrid's gathered
columns, gathered hidden rows and their gradient; nothing [N, V].

Backends (``impl``): ``"torch"`` everywhere (on CUDA the sort is torch's segmented sort of the
chunk, no Triton sort); ``"cpp"`` on CPU (the sorted L1 by a per-row radix sort in C++; the
hybrid's JSD and sorted L1 in one C++ pass over each row that gathers its columns itself; the
rest in torch); ``"auto"``: cpp on CPU when the extension builds, else torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import gemm
from ..engine.chunking import balanced_rows
from . import rows as R
from .align import AlignedGroups, align_batch
from .checks import (
    check_float_tensor,
    check_labels,
    check_loss_options,
    check_same_device,
    check_vocab_map,
)
from .logits import hybrid_columns, hybrid_weights

IMPLS = ("auto", "torch", "cpp")
# The default workspace (per-chunk buffers, sort buffers included): at S1-like shapes (Vs 32k,
# Vt 50k) chunks of ~290 groups with the C++ sort, ~90 with torch.sort; wider chunks gain
# little on CPU (the GEMMs are already wide) and cost memory. On GPUs pass a larger budget.
DEFAULT_ULD_WORKSPACE_BYTES = 128 * 2**20


# ----------------------------------------------------------------------------- the options


@dataclass(frozen=True)
class UldConfig:
    """The checked options of one call, with the hybrid's column sets."""

    hybrid: bool
    mw: float
    uw: float
    beta: float
    ts: float
    tt: float
    dw: float
    cw: float
    reduction: str
    top_k: int | None
    impl: str  # "torch" | "cpp" (resolved)
    chunk_size: int | None
    budget: int
    ignore_index: int
    s_matched: torch.Tensor | None = None  # student columns of the matched teacher ids
    t_matched: torch.Tensor | None = None
    s_free: torch.Tensor | None = None  # unmatched columns
    t_free: torch.Tensor | None = None


def _positive_int(name: str, value, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int{' or None' if allow_none else ''}, "
                        f"got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_head(wname: str, w, hname: str, h, bname: str, b) -> None:
    check_float_tensor(wname, w, "[V, D]")
    if w.shape[1] != h.shape[-1] or w.shape[0] < 1:
        raise ValueError(f"{wname} must be [V, D] with V >= 1 and D = {hname}.shape[-1] = "
                         f"{h.shape[-1]}; got {tuple(w.shape)}")
    if w.dtype != h.dtype:
        raise TypeError(f"{hname} and {wname} must share a dtype; got {h.dtype} and {w.dtype}")
    if b is not None:
        if not isinstance(b, torch.Tensor) or not b.is_floating_point():
            raise TypeError(f"{bname} must be a floating torch.Tensor or None")
        if b.shape != (w.shape[0],):
            raise ValueError(f"{bname} must be [{w.shape[0]}] (one entry per head row); got "
                             f"{tuple(b.shape)}")


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend of the sorted L1: ``cpp`` needs CPU fp32 rows and the built extension."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "torch":
        return "torch"
    why = cpp_unavailable(device, dtype)
    if impl == "cpp" and why:
        raise ValueError(f"impl='cpp' is not available here: {why}")
    return "torch" if why else "cpp"


def cpp_unavailable(device: torch.device, dtype: torch.dtype) -> str:
    """Why the C++ sorted L1 cannot serve these rows ('' when it can)."""
    if device.type != "cpu":
        return f"it runs on CPU tensors, got {device}"
    if dtype == torch.float64:
        return "its rows are float32 (float64 inputs run in float64 with impl='torch')"
    try:
        from . import _cpp

        _cpp.load()
    except ImportError as err:
        return str(err)
    return ""


# ----------------------------------------------------------------------------- row sets


@dataclass
class RowSets:
    """Which flat rows each pass visits (built once per call, reused by a recompute)."""

    n_samples: int
    s_len: int  # Ls
    sample: torch.Tensor  # [G]
    inv_groups: torch.Tensor  # [G] 1 / (groups of the group's sample)
    s_base: torch.Tensor  # [G] student base rows
    t_base: torch.Tensor  # [G] teacher base rows
    base_lab: torch.Tensor | None  # [G] CE label of each student base row (-1: none)
    r1: torch.Tensor  # [R] student rows of passes 1 and 3 (merge scalars, leftover CE)
    r1_tok: torch.Tensor  # [R] scalar token (-1: not a scalar row)
    r1_grp: torch.Tensor  # [R] its group (G, a dump slot, where not a scalar row)
    r1_lab: torch.Tensor | None  # [R] CE label (-1: none)
    t_rows: torch.Tensor  # [St] teacher scalar rows
    t_tok: torch.Tensor
    t_grp: torch.Tensor
    n_ce: int  # labelled next-token positions (the CE's token count)


def build_row_sets(groups: AlignedGroups, labels: torch.Tensor, cw: float, ignore_index: int,
                   vocab: int, n_rows: int) -> RowSets:
    B, Ls = labels.shape
    dev = groups.sample.device
    s, t = groups.student, groups.teacher
    gps = groups.groups_per_sample.to(dev)
    inv = 1.0 / gps.clamp_min(1).to(torch.float64)
    need = torch.zeros(n_rows, dtype=torch.bool, device=dev)
    need[s.scalar_rows] = True
    tok = torch.full((n_rows,), -1, dtype=torch.long, device=dev)
    tok[s.scalar_rows] = s.scalar_tokens
    n_groups = groups.sample.numel()
    grp = torch.full((n_rows,), n_groups, dtype=torch.long, device=dev)  # G: a dump slot
    grp[s.scalar_rows] = s.scalar_group
    base_lab = r1_lab = None
    n_ce = 0
    lab_next = None
    if cw > 0:
        nxt = torch.full((B, Ls), ignore_index, dtype=torch.long, device=dev)
        nxt[:, :-1] = labels[:, 1:].to(dev)
        lab_next = nxt.reshape(-1)
        valid = lab_next != ignore_index
        n_ce = int(valid.sum())
        if n_ce:
            used = lab_next[valid]
            lo, hi = int(used.min()), int(used.max())
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                raise ValueError(f"student_labels has label {bad}, outside [0, {vocab}) and "
                                 f"not ignore_index ({ignore_index})")
        lab_next = torch.where(valid, lab_next, torch.full_like(lab_next, -1))
        leftover = valid.clone()
        leftover[s.base_rows] = False
        need |= leftover
        base_lab = lab_next[s.base_rows]
    r1 = torch.nonzero(need).squeeze(1)
    if lab_next is not None:
        r1_lab = lab_next[r1].clone()
        r1_lab[torch.isin(r1, s.base_rows)] = -1  # their CE is taken in pass 2
    return RowSets(B, Ls, groups.sample, inv[groups.sample], s.base_rows, t.base_rows, base_lab,
                   r1, tok[r1], grp[r1], r1_lab, t.scalar_rows, t.scalar_tokens, t.scalar_group,
                   n_ce)


# ----------------------------------------------------------------------------- the passes


_CAST_BLOCK_BYTES = 16 * 2**20  # a head block cast to the GEMM dtype at a time


class _Head:
    """One side's head: weight, bias, the GEMM dtype and the logits dtype of its GEMMs.

    Where the GEMMs run wider than the weight (bf16 on CPUs without native bf16 GEMMs), the
    weight is cast a block of rows at a time (``_CAST_BLOCK_BYTES``), never as a whole
    [V, D] copy: for the teacher's head at S1 that copy alone would be 200 MB."""

    def __init__(self, x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
        self.x = x2
        self.cd = gemm.compute_dtype(x2.dtype, x2.device)
        self.blocked = w.dtype != self.cd
        self.w = w.detach()
        self.b = b
        self.zdt = gemm.logits_dtype(self.cd, x2.device)
        self.vocab = w.shape[0]
        self.block = max(1, _CAST_BLOCK_BYTES // (w.shape[1] * self.cd.itemsize))

    @property
    def fixed_bytes(self) -> int:
        """Workspace besides the per-row buffers: one cast block."""
        return self.block * self.w.shape[1] * self.cd.itemsize if self.blocked else 0

    def _blocks(self):
        for s in range(0, self.vocab, self.block):
            e = min(self.vocab, s + self.block)
            yield s, e, self.w[s:e].to(self.cd)

    def logits_into(self, xs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.blocked:
            return gemm.logits_into(xs, self.w, self.b, out)
        for s, e, wb in self._blocks():
            gemm.logits_into(xs, wb, None if self.b is None else self.b[s:e], out[:, s:e])
        return out

    def dz_times_w(self, dz: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = dz @ W (dz in the GEMM dtype)."""
        if not self.blocked:
            return torch.mm(dz, self.w, out=out)
        out.zero_()
        for s, e, wb in self._blocks():
            out.addmm_(dz[:, s:e], wb)
        return out


def _logits(head: _Head, rows: torch.Tensor, ws: R.Workspace, side: str, rdt: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the gathered hidden rows in the GEMM dtype, their logits as fp32 rows in ws)."""
    c = rows.numel()
    xs = ws.get(side + "x", c, head.x.shape[1], head.cd)
    if head.x.dtype == head.cd:
        torch.index_select(head.x, 0, rows, out=xs)
    else:
        xs.copy_(head.x.index_select(0, rows))  # a [c, D] temporary
    z = ws.get(side + "z", c, head.vocab, rdt)
    if head.zdt == rdt:
        head.logits_into(xs, z)
    else:
        zh = ws.get(side + "zh", c, head.vocab, head.zdt)
        z.copy_(head.logits_into(xs, zh))
    return xs, z


class _Grads:
    """The student's gradient accumulators and the gradient GEMMs of one chunk."""

    def __init__(self, head: _Head, want_h: bool, want_w: bool, want_b: bool,
                 h_dtype: torch.dtype, rdt: torch.dtype) -> None:
        self.head, self.rdt, self.h_dtype = head, rdt, h_dtype
        dev = head.x.device
        self.gh = (torch.zeros(head.x.shape, dtype=h_dtype, device=dev) if want_h else None)
        self.gw = (torch.zeros(head.w.shape, dtype=rdt, device=dev) if want_w else None)
        self.gb = (torch.zeros(head.vocab, dtype=rdt, device=dev)
                   if want_b and head.b is not None else None)

    @property
    def any(self) -> bool:
        return self.gh is not None or self.gw is not None or self.gb is not None

    def add(self, dz: torch.Tensor, xs: torch.Tensor, rows: torch.Tensor,
            ws: R.Workspace) -> None:
        """dz [c, V] (fp32 rows) of the hidden rows xs gathered from ``rows``."""
        head, c = self.head, dz.shape[0]
        if head.cd != dz.dtype:
            dz = ws.get("dzc", c, head.vocab, head.cd).copy_(dz)
        if self.gh is not None:
            part = head.dz_times_w(dz, ws.get("gh", c, head.w.shape[1], head.cd))
            self.gh.index_add_(0, rows, part if part.dtype == self.h_dtype
                               else part.to(self.h_dtype))
        if self.gw is not None:
            gemm.accumulate_matmul_(self.gw, dz.t(), xs)
        if self.gb is not None:
            self.gb += dz.sum(0, dtype=self.rdt)


def bytes_per_row(cfg: UldConfig, s: _Head, t: _Head, rdt: torch.dtype, want_grad: bool,
                  n_matched: int, n_s_free: int, n_t_free: int) -> int:
    """Workspace bytes per chunk row (the largest pass: pass 2), as ``Workspace`` allocates."""
    e = rdt.itemsize
    vs, vt = s.vocab, t.vocab
    n = e * (2 * vs + vt)  # student rows, dL/dP (also scratch), teacher rows
    n += s.x.shape[1] * s.cd.itemsize + t.x.shape[1] * t.cd.itemsize  # gathered hidden rows
    if s.zdt != rdt:
        n += vs * s.zdt.itemsize
    if t.zdt != rdt:
        n += vt * t.zdt.itemsize
    if want_grad:
        n += s.x.shape[1] * s.cd.itemsize  # the grad_hidden part
        if s.cd != rdt:
            n += vs * s.cd.itemsize
    if cfg.hybrid and cfg.impl == "cpp":
        pass  # gathers and sorts inside each row: no per-chunk buffers
    elif cfg.hybrid:
        if n_matched:
            n += R.jsd_bytes_per_row(n_matched, e)
        if n_s_free and n_t_free:
            n += e * (2 * n_s_free + n_t_free)
            n += R.sort_bytes_per_row(cfg.impl, (n_s_free, n_t_free), cfg.top_k, e)
    else:
        n += R.sort_bytes_per_row(cfg.impl, (vs, vt), cfg.top_k, e)
    return n


@dataclass
class PassResult:
    per_sample: torch.Tensor  # [B] the distillation term of each sample (before dw)
    ce_per_sample: torch.Tensor  # [B] each sample's summed CE (before cw / n_ce)
    grad_h: torch.Tensor | None
    grad_w: torch.Tensor | None
    grad_b: torch.Tensor | None


def run_passes(s: _Head, t: _Head, rs: RowSets, cfg: UldConfig, rdt: torch.dtype,
               sample_weight: torch.Tensor | None, want: tuple[bool, bool, bool],
               dist_scale: float = 1.0) -> PassResult:
    """The three passes. ``sample_weight`` [B]: d(loss)/d(each sample's term) for the
    gradient (None: loss only); the distillation terms are further scaled by ``dist_scale``
    (1 / B for the mean over samples; the CE is a mean over tokens already)."""
    dev = s.x.device
    B, G = rs.n_samples, rs.s_base.numel()
    grads = _Grads(s, *want, h_dtype=s.x.dtype, rdt=rdt) if sample_weight is not None else None
    want_grad = grads is not None and grads.any
    n_m = 0 if cfg.s_matched is None else cfg.s_matched.numel()
    n_sf = 0 if cfg.s_free is None else cfg.s_free.numel()
    n_tf = 0 if cfg.t_free is None else cfg.t_free.numel()
    n_rows = max(G, rs.r1.numel(), rs.t_rows.numel(), 1)
    if cfg.chunk_size is not None:
        c_max = min(cfg.chunk_size, n_rows)
    else:
        per = bytes_per_row(cfg, s, t, rdt, want_grad, n_m, n_sf, n_tf)
        rows_fit = (cfg.budget - max(s.fixed_bytes, t.fixed_bytes)) // per
        c_max = balanced_rows(n_rows, max(1, rows_fit))
    ws = R.Workspace(c_max, dev)
    per_sample = torch.zeros(B, dtype=rdt, device=dev)
    ce_sample = torch.zeros(B, dtype=rdt, device=dev)
    try:
        log_cs, keep_s, ce1 = _pass_scalars_stats(s, rs.r1, rs.r1_tok, rs.r1_grp, rs.r1_lab,
                                                  cfg.ts, G, ws, c_max, rdt, "s")
        log_ct, _, _ = _pass_scalars_stats(t, rs.t_rows, rs.t_tok, rs.t_grp, None, cfg.tt, G,
                                           ws, c_max, rdt, "t")
        if ce1 is not None:
            ce_sample.index_add_(0, torch.div(rs.r1, rs.s_len, rounding_mode="floor"), ce1)
        cs, ct = log_cs.exp(), log_ct.exp()
        w_group = w_ce = None
        if want_grad:
            sw = sample_weight.to(rdt)
            w_group = (cfg.dw * dist_scale) * sw[rs.sample] * rs.inv_groups.to(rdt)
            if cfg.cw > 0 and rs.n_ce:
                w_ce = cfg.cw * sw / rs.n_ce  # per sample
        dlogc = torch.zeros(G + 1, dtype=rdt, device=dev) if want_grad else None  # + dump
        for start in range(0, G, c_max):
            stop = min(G, start + c_max)
            loss_g, ce_g = _pass_groups(s, t, rs, cfg, start, stop, cs, ct, ws, rdt,
                                        w_group, w_ce, dlogc, grads)
            smp = rs.sample[start:stop]
            per_sample.index_add_(0, smp, loss_g * rs.inv_groups[start:stop].to(rdt))
            if ce_g is not None:
                ce_sample.index_add_(0, smp, ce_g)
        if want_grad and rs.r1.numel():
            _pass_scalars_grad(s, rs, cfg, dlogc, keep_s, w_ce, grads, ws, c_max, rdt)
    finally:
        ws.release()
    if grads is None:
        return PassResult(per_sample, ce_sample, None, None, None)
    return PassResult(per_sample, ce_sample, grads.gh, grads.gw, grads.gb)


def _pass_scalars_stats(head: _Head, rows, tok, grp, lab, temperature: float, n_groups: int,
                        ws: R.Workspace, c_max: int, rdt, side: str):
    """Pass 1 on one side: (log c [G] of the merge scales, the clamp's keep mask per row,
    the CE of each row with a label (0 elsewhere) or None)."""
    dev = head.x.device
    log_c = torch.zeros(n_groups + 1, dtype=rdt, device=dev)  # + the dump slot
    keep = torch.zeros(rows.numel(), dtype=torch.bool, device=dev)
    ce = None if lab is None else torch.zeros(rows.numel(), dtype=rdt, device=dev)
    for start in range(0, rows.numel(), c_max):
        stop = min(rows.numel(), start + c_max)
        _, z = _logits(head, rows[start:stop], ws, side, rdt)
        tk = tok[start:stop]
        is_scalar = tk >= 0
        z_tok = z.gather(1, tk.clamp_min(0)[:, None]).squeeze(1)
        if ce is not None:
            lb = lab[start:stop]
            has = lb >= 0
            z_lab = z.gather(1, lb.clamp_min(0)[:, None]).squeeze(1)
            if temperature != 1.0 and bool(has.any()):
                scratch = ws.get(side + "g", stop - start, head.vocab, rdt).copy_(z)
                lse1 = R.lse_(scratch)
            else:
                lse1 = None
        lse_t = R.softmax_(z, temperature)  # z -> p (not needed after)
        logp = z_tok / temperature - lse_t
        p = logp.exp()
        k = is_scalar & (p >= R.CLAMP)
        keep[start:stop] = k
        contrib = torch.where(is_scalar, p.clamp_min(R.CLAMP).log(), torch.zeros_like(p))
        log_c.index_add_(0, grp[start:stop], contrib)
        if ce is not None:
            lse1 = lse_t if lse1 is None else lse1
            ce[start:stop] = torch.where(has, lse1 - z_lab, torch.zeros_like(lse1))
    return log_c[:n_groups], keep, ce


def _pass_groups(s: _Head, t: _Head, rs: RowSets, cfg: UldConfig, start: int, stop: int,
                 cs, ct, ws: R.Workspace, rdt, w_group, w_ce, dlogc, grads: _Grads | None):
    """Pass 2 on the groups [start, stop): their losses [c] (and the CE of their base rows),
    and with a gradient, dL/dz of the base rows through their GEMMs."""
    c = stop - start
    rows_s = rs.s_base[start:stop]
    xs, A = _logits(s, rows_s, ws, "s", rdt)
    gP = ws.get("sg", c, s.vocab, rdt)
    ce_g = lse1 = z_lab = has = None
    if rs.base_lab is not None:
        lab = rs.base_lab[start:stop]
        has = lab >= 0
        z_lab = A.gather(1, lab.clamp_min(0)[:, None]).squeeze(1)
        if cfg.ts != 1.0:
            lse1 = R.lse_(gP.copy_(A))
    lse_t = R.softmax_(A, cfg.ts)  # A = p_s
    if rs.base_lab is not None:
        lse1 = lse_t if lse1 is None else lse1
        ce_g = torch.where(has, lse1 - z_lab, torch.zeros_like(lse1))
    _, D = _logits(t, rs.t_base[start:stop], ws, "t", rdt)
    R.softmax_(D, cfg.tt)  # D = p_t
    cs_c, ct_c = cs[start:stop], ct[start:stop]
    want_grad = dlogc is not None
    if not cfg.hybrid:
        loss = R.sorted_l1(A, cs_c, D, ct_c, gP, cfg.top_k, cfg.impl, ws)
    else:
        loss = R.hybrid(A, cs_c, D, ct_c, cfg, gP, want_grad, ws)
    if not want_grad:
        return loss, ce_g
    wg = w_group[start:stop]
    S = R.rowdot(A, gP)  # dL/dc per unit weight
    dlogc[start:stop] = S * cs_c * wg
    coef = cs_c * wg / cfg.ts
    gP.sub_(S[:, None]).mul_(A).mul_(coef[:, None])  # dL/dz of the distillation term
    if ce_g is not None and w_ce is not None:
        cc = torch.where(has, w_ce[rs.sample[start:stop]], torch.zeros_like(lse_t))
        if cfg.ts != 1.0:  # softmax(z) from p = softmax(z / T): p^T exp(T lse_T - lse_1)
            A.log_().mul_(cfg.ts).add_((cfg.ts * lse_t - lse1)[:, None]).exp_()
        gP.addcmul_(A, cc[:, None])
        gP.scatter_add_(1, rs.base_lab[start:stop].clamp_min(0)[:, None], -cc[:, None])
    grads.add(gP, xs, rows_s, ws)
    return loss, ce_g


def _pass_scalars_grad(s: _Head, rs: RowSets, cfg: UldConfig, dlogc, keep, w_ce,
                       grads: _Grads, ws: R.Workspace, c_max: int, rdt) -> None:
    """Pass 3: the merge scalars' CE-like gradient and the leftover rows' CE gradient."""
    n = rs.r1.numel()
    for start in range(0, n, c_max):
        stop = min(n, start + c_max)
        c = stop - start
        rows = rs.r1[start:stop]
        xs, A = _logits(s, rows, ws, "s", rdt)
        tok = rs.r1_tok[start:stop]
        a = torch.where(keep[start:stop], dlogc[rs.r1_grp[start:stop]],
                        torch.zeros(c, dtype=rdt, device=A.device))  # dL/dlog p[row, tok]
        b = None
        if rs.r1_lab is not None and w_ce is not None:
            lab = rs.r1_lab[start:stop]
            smp = torch.div(rows, rs.s_len, rounding_mode="floor")
            b = torch.where(lab >= 0, w_ce[smp], torch.zeros_like(a))
        if b is not None and cfg.ts != 1.0:
            p1 = ws.get("sg", c, s.vocab, rdt).copy_(A)
            R.softmax_(p1, 1.0)
            R.softmax_(A, cfg.ts)
            A.mul_((-a / cfg.ts)[:, None]).addcmul_(p1, b[:, None])
        else:
            R.softmax_(A, cfg.ts)
            k = -a / cfg.ts if b is None else b - a / cfg.ts
            A.mul_(k[:, None])
        A.scatter_add_(1, tok.clamp_min(0)[:, None], (a / cfg.ts)[:, None])
        if b is not None:
            A.scatter_add_(1, rs.r1_lab[start:stop].clamp_min(0)[:, None], -b[:, None])
        grads.add(A, xs, rows, ws)


# ----------------------------------------------------------------------------- autograd


class FusedULD(torch.autograd.Function):
    """Inputs h [N, Ds], w, bs, g [N, Dt], u, bt; the loss and its gradient in forward."""

    @staticmethod
    def forward(ctx, h, w, bs, g, u, bt, rs: RowSets, cfg: UldConfig):
        rdt = torch.float64 if h.dtype == torch.float64 else torch.float32
        want = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        s_head, t_head = _Head(h, w, bs), _Head(g, u, bt)
        B = rs.n_samples
        eager = cfg.reduction != "none" and any(want)
        sw = torch.ones(B, dtype=rdt, device=h.device) if eager else None
        scale = 1.0 / max(B, 1) if cfg.reduction == "mean" else 1.0
        res = run_passes(s_head, t_head, rs, cfg, rdt, sw, want, scale)
        del s_head, t_head  # their weight casts
        dist = cfg.dw * res.per_sample
        ce = (cfg.cw / rs.n_ce) * res.ce_per_sample if cfg.cw > 0 and rs.n_ce else None
        if cfg.reduction == "none":
            loss = dist if ce is None else dist + ce
        else:
            loss = dist.sum() / (max(B, 1) if cfg.reduction == "mean" else 1)
            if ce is not None:
                loss = loss + ce.sum()
        if eager:
            grads = (res.grad_h, _out_grad(res.grad_w, w), _out_grad(res.grad_b, bs))
            ctx.save_for_backward(*grads)
            ctx.recompute = None
        else:
            ctx.save_for_backward(None, None, None)

            def recompute(go):
                r = run_passes(_Head(h, w, bs), _Head(g, u, bt), rs, cfg, rdt, go, want)
                return r.grad_h, _out_grad(r.grad_w, w), _out_grad(r.grad_b, bs)

            ctx.recompute = recompute if any(want) else None
        return loss

    @staticmethod
    def backward(ctx, go):
        if ctx.recompute is not None:
            gh, gw, gb = ctx.recompute(go.detach())
        else:
            gh, gw, gb = (_scale(x, go) for x in ctx.saved_tensors)
        return gh, gw, gb, None, None, None, None, None


def _out_grad(acc: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    if acc is None or like is None:
        return None
    return acc if acc.dtype == like.dtype else acc.to(like.dtype)


def _scale(grad: torch.Tensor | None, go: torch.Tensor) -> torch.Tensor | None:
    if grad is None:
        return None
    return grad if bool(go == 1) else grad * go.to(grad.dtype)


# ----------------------------------------------------------------------------- public API


def fused_linear_uld_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    student_input_ids: torch.Tensor,
    teacher_input_ids: torch.Tensor,
    student_offsets: torch.Tensor | None = None,
    teacher_offsets: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    merge: str = "observed",
    vocab_map: torch.Tensor | None = None,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    beta: float = 0.5,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    skip_student_eos: bool = True,
    skip_teacher_eos: bool = True,
    distillation_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    max_workspace_bytes: int | None = None,
    uld_top_k: int | None = None,
) -> torch.Tensor:
    """``uld_loss`` (``kdkernels.uld_loss``) on ``logits = hidden @ weight.T + bias``, fused:
    chunked over aligned groups, no [tokens x vocab] tensor ever.

    student_hidden [B, Ls, Ds], student_weight [Vs, Ds], teacher_hidden [B, Lt, Dt],
    teacher_weight [Vt, Dt]; labels, input ids and optional UTF-8 byte offsets as for
    ``uld_loss`` (same options, same semantics: TRL 1.16's ``ULDLoss``). Extra options:

    * ``chunk_size``: groups (rows) per chunk; default from ``max_workspace_bytes``
      (default 128 MiB), which bounds every per-chunk buffer: the fp32 student and teacher
      rows, dL/dP, the sort buffers (values and int64 indices of both sides with
      ``impl="torch"``; the C++ sort needs none), the hybrid's gathered columns, the gathered
      hidden rows. Besides it, the call holds the fp32 grad_weight accumulator, grad_hidden,
      and per-row vectors.
    * ``impl``: ``"torch"`` (CPU and CUDA; on CUDA the sort is ``torch.sort`` of the chunk),
      ``"cpp"`` (CPU: a per-row radix sort in C++), ``"auto"``.
    * ``uld_top_k=K``: the top-k ULD variant, ``sum_{r<K} |P_r - Q_r| + |tail_P - tail_Q|``
      per row (tail: the merged row's mass outside its K largest values), with
      ``torch.topk`` instead of a sort. A lower bound of the full sorted L1, exact when the
      differences past rank K share a sign, equal to it when K >= both widths. With
      ``vocab_map`` it replaces the unmatched columns' sorted L1.

    Half-precision inputs: GEMMs in the input dtype (fp32 on CPUs without native half GEMMs,
    as the rest of kdkernels), row math in fp32; the loss is fp32, the gradients in the
    inputs' dtypes. Gradients reach student_hidden, student_weight and student_bias only.
    """
    h = check_float_tensor("student_hidden", student_hidden, "[B, L, D]")
    g = check_float_tensor("teacher_hidden", teacher_hidden, "[B, L, D]")
    _check_head("student_weight", student_weight, "student_hidden", h, "student_bias",
                student_bias)
    _check_head("teacher_weight", teacher_weight, "teacher_hidden", g, "teacher_bias",
                teacher_bias)
    ts, tt, beta, dw, cw, matched_weight, unmatched_weight = check_loss_options(
        merge=merge, reduction=reduction, student_temperature=student_temperature,
        teacher_temperature=teacher_temperature, beta=beta,
        distillation_weight=distillation_weight, ce_weight=ce_weight,
        matched_weight=matched_weight, unmatched_weight=unmatched_weight)
    chunk_size = _positive_int("chunk_size", chunk_size)
    budget = _positive_int("max_workspace_bytes", max_workspace_bytes)
    top_k = _positive_int("uld_top_k", uld_top_k)
    device = h.device
    check_same_device("student_hidden", device, (
        ("teacher_hidden", g), ("student_weight", student_weight),
        ("teacher_weight", teacher_weight), ("student_bias", student_bias),
        ("teacher_bias", teacher_bias), ("student_labels", student_labels),
        ("teacher_labels", teacher_labels), ("student_input_ids", student_input_ids),
        ("teacher_input_ids", teacher_input_ids),
        ("student_offsets", student_offsets), ("teacher_offsets", teacher_offsets)))
    check_labels(student_labels, h, teacher_labels, g, "hidden")
    if h.shape[0] != g.shape[0]:
        raise ValueError(f"teacher_hidden has batch size {g.shape[0]}, student_hidden "
                         f"{h.shape[0]}: they must agree")
    vs, vt = student_weight.shape[0], teacher_weight.shape[0]
    rdt = torch.float64 if h.dtype == torch.float64 else torch.float32
    cfg_impl = resolve_impl(impl, device, rdt)
    hybrid = vocab_map is not None
    cols: dict[str, torch.Tensor | None] = {}
    mw = uw = 0.0
    if hybrid:
        vmap = check_vocab_map(vocab_map, vt, vs, device)
        mw, uw = hybrid_weights(vmap, matched_weight, unmatched_weight)
        cols = dict(zip(("s_matched", "t_matched", "s_free", "t_free"),
                        hybrid_columns(vmap, vs), strict=True))
    groups = align_batch(student_labels, teacher_labels, student_input_ids, teacher_input_ids,
                         student_offsets, teacher_offsets, merge=merge,
                         skip_student_eos=skip_student_eos, skip_teacher_eos=skip_teacher_eos,
                         ignore_index=ignore_index, student_vocab_size=vs,
                         teacher_vocab_size=vt, device=device)
    cfg = UldConfig(hybrid, float(mw), float(uw), beta, ts, tt, dw, cw, reduction, top_k,
                    cfg_impl, chunk_size, budget or DEFAULT_ULD_WORKSPACE_BYTES, ignore_index,
                    **cols)
    B, Ls = student_labels.shape
    rs = build_row_sets(groups, student_labels, cw, ignore_index, vs, B * Ls)
    h2 = h.reshape(B * Ls, h.shape[-1])
    g2 = g.detach().reshape(B * g.shape[1], g.shape[-1])
    u = teacher_weight.detach()
    bt = None if teacher_bias is None else teacher_bias.detach()
    return FusedULD.apply(h2, student_weight, student_bias, g2, u, bt, rs, cfg)
