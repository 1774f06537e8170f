"""A float64 oracle of the cross-tokenizer loss, written from the math, one sample at a time.

It shares no code with what it judges (nothing from the package, nothing from TRL): its own span
finding, its own byte-span walk, its own merge, sort, JSD and reductions, row by row in float64.
Differentiable (autograd through the float64 copy of the student logits), slow, for tests only.
"""

from __future__ import annotations

import torch

EPS = 1e-8  # GOLD's clamp of the merge scalars and of the JSD's probabilities


def _answer_span(labels_row: list[int], ignore_index: int, skip_eos: bool) -> tuple[int, int]:
    kept = [k for k, y in enumerate(labels_row) if y != ignore_index]
    if not kept:
        return 0, 0
    return kept[0], len(kept) - (1 if skip_eos else 0)


def _byte_groups(s_ends: list[int], t_ends: list[int]) -> list[tuple[list[int], list[int]]]:
    """Positions of each aligned group: close a group where both sides end on the same byte."""
    out: list[tuple[list[int], list[int]]] = []
    s_cur: list[int] = []
    t_cur: list[int] = []
    i = j = 0
    while i < len(s_ends) and j < len(t_ends):
        if s_ends[i] == t_ends[j]:
            s_cur.append(i)
            t_cur.append(j)
            out.append((s_cur, t_cur))
            s_cur, t_cur = [], []
            i += 1
            j += 1
        elif s_ends[i] < t_ends[j]:
            s_cur.append(i)
            i += 1
        else:
            t_cur.append(j)
            j += 1
    s_cur += list(range(i, len(s_ends)))
    t_cur += list(range(j, len(t_ends)))
    if s_cur or t_cur:
        out.append((s_cur, t_cur))
    return out


def _merged(probs: torch.Tensor, positions: list[int], token_ids: list[int],
            bayesian: bool) -> torch.Tensor:
    base = positions[-1] if bayesian else positions[0]
    row = probs[base]
    for k in positions:
        if k != base:
            row = row * torch.clamp(probs[k, token_ids[k]], min=EPS)
    return row


def _sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    width = max(p.numel(), q.numel())
    ps = torch.zeros(width, dtype=p.dtype)
    qs = torch.zeros(width, dtype=q.dtype)
    ps = ps.index_put((torch.arange(p.numel()),), torch.sort(p, descending=True).values)
    qs = qs.index_put((torch.arange(q.numel()),), torch.sort(q, descending=True).values)
    return torch.sum(torch.abs(ps - qs))


def _generalized_jsd(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """GOLD's JSD on raw probabilities (student p, teacher q), both clamped at EPS first:
    beta 0 is KL(q || p), beta 1 is KL(p || q), else beta KL(q || m) + (1 - beta) KL(p || m)
    with m = (1 - beta) p + beta q."""
    p = torch.clamp(p, min=EPS)
    q = torch.clamp(q, min=EPS)
    if beta == 0.0:
        return torch.sum(q * (torch.log(q) - torch.log(p)))
    if beta == 1.0:
        return torch.sum(p * (torch.log(p) - torch.log(q)))
    m = (1.0 - beta) * p + beta * q
    return (beta * torch.sum(q * (torch.log(q) - torch.log(m)))
            + (1.0 - beta) * torch.sum(p * (torch.log(p) - torch.log(m))))


def uld_loss_reference(
    student_logits, teacher_logits, student_labels, teacher_labels, student_input_ids,
    teacher_input_ids, student_offsets=None, teacher_offsets=None, *, merge="observed",
    vocab_map=None, matched_weight=None, unmatched_weight=None, beta=0.5,
    student_temperature=1.0, teacher_temperature=1.0, skip_student_eos=True,
    skip_teacher_eos=True, distillation_weight=1.0, ce_weight=0.0, ignore_index=-100,
    reduction="mean",
) -> torch.Tensor:
    """The loss in float64 (gradient to ``student_logits`` through autograd)."""
    if merge not in ("observed", "bayesian"):
        raise ValueError(f"merge: {merge!r}")
    bayesian = merge == "bayesian"
    zs = student_logits.to(torch.float64)
    zt = teacher_logits.detach().to(torch.float64)
    B, _, Vs = zs.shape
    Vt = zt.shape[-1]
    s_lab, t_lab = student_labels.tolist(), teacher_labels.tolist()
    s_ids, t_ids = student_input_ids.tolist(), teacher_input_ids.tolist()
    with_offsets = student_offsets is not None
    if vocab_map is not None:
        vmap = [int(v) for v in vocab_map.tolist()]
        t_matched = [t for t in range(Vt) if vmap[t] >= 0]
        s_matched = [vmap[t] for t in t_matched]
        t_free = [t for t in range(Vt) if vmap[t] < 0]
        taken = set(s_matched)
        s_free = [s for s in range(Vs) if s not in taken]
        mw = len(t_matched) / Vt if matched_weight is None else float(matched_weight)
        uw = 1.0 - mw if unmatched_weight is None else float(unmatched_weight)

    per_sample = []
    for b in range(B):
        s0, ns = _answer_span(s_lab[b], ignore_index, skip_student_eos)
        t0, nt = _answer_span(t_lab[b], ignore_index, skip_teacher_eos)
        zero = zs[b].sum() * 0.0
        if ns <= 0 or nt <= 0:
            per_sample.append(zero)
            continue
        if with_offsets:
            s_ends = [int(e) for _, e in student_offsets[b, s0:s0 + ns].tolist()]
            t_ends = [int(e) for _, e in teacher_offsets[b, t0:t0 + nt].tolist()]
            groups = _byte_groups(s_ends, t_ends)
            if bayesian and (s0 == 0 or t0 == 0):
                ds, dt = len(groups[0][0]), len(groups[0][1])
                groups = [([k - ds for k in g], [k - dt for k in h]) for g, h in groups[1:]]
                s0, ns, t0, nt = s0 + ds, ns - ds, t0 + dt, nt - dt
            groups = [(g, h) for g, h in groups if g and h]
        else:
            if bayesian and (s0 == 0 or t0 == 0):
                s0, ns, t0, nt = s0 + 1, ns - 1, t0 + 1, nt - 1
            groups = [([k], [k]) for k in range(min(ns, nt))]
        if ns <= 0 or nt <= 0 or not groups:
            per_sample.append(zero)
            continue
        shift = 1 if bayesian else 0
        ps = torch.softmax(zs[b, s0 - shift: s0 - shift + ns] / student_temperature, dim=-1)
        pt = torch.softmax(zt[b, t0 - shift: t0 - shift + nt] / teacher_temperature, dim=-1)
        sid = s_ids[b][s0: s0 + ns]
        tid = t_ids[b][t0: t0 + nt]
        total = zero
        for g, h in groups:
            p = _merged(ps, g, sid, bayesian)
            q = _merged(pt, h, tid, bayesian)
            if vocab_map is None:
                total = total + _sorted_l1(p, q)
                continue
            if t_matched:
                total = total + mw * _generalized_jsd(p[s_matched], q[t_matched], beta)
            if t_free and s_free:
                total = total + uw * _sorted_l1(p[s_free], q[t_free])
        per_sample.append(total / len(groups))
    losses = (torch.stack(per_sample) if per_sample else zs.new_zeros(0)) * distillation_weight

    ce_rows = [zs[b].sum() * 0.0 for b in range(B)]
    n_tok = 0
    if ce_weight > 0:
        for b in range(B):
            for k in range(1, len(s_lab[b])):
                y = s_lab[b][k]
                if y != ignore_index:
                    ce_rows[b] = ce_rows[b] - torch.log_softmax(zs[b, k - 1], dim=-1)[y]
                    n_tok += 1
    ce = [ce_weight * c / max(n_tok, 1) for c in ce_rows]
    ce_vec = torch.stack(ce) if ce else zs.new_zeros(0)
    if reduction == "none":
        return losses + ce_vec
    dist = losses.sum() if reduction == "sum" else losses.sum() / max(B, 1)
    return dist + ce_vec.sum()
