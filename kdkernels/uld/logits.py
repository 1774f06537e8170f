"""``uld_loss``: ULD / GOLD's hybrid loss on materialised logits, with TRL 1.16's semantics.

Vectorised over aligned groups (no loop over samples or rows): gather each group's base row and
its merge scalars' rows, softmax them at their temperature, multiply each base row by the
product of its clamped scalars, sort the rows, and reduce per sample with segment sums.
Autograd reaches the student logits (through the base rows and the merge scalars); the teacher
side runs under ``no_grad``. Half-precision logits are computed in float32, float64 in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .align import AlignedGroups, align_batch
from .checks import (
    check_float_tensor,
    check_labels,
    check_loss_options,
    check_same_device,
    check_vocab_map,
)

EPS = 1e-8  # GOLD's clamp of the merge scalars and of the JSD's raw probabilities
IMPLS = ("auto", "torch")


def hybrid_weights(vocab_map: torch.Tensor, matched_weight, unmatched_weight) -> tuple:
    """(matched, unmatched) weights: matched defaults to the matched share of the teacher's
    columns, unmatched to 1 - matched."""
    n_matched = int((vocab_map >= 0).sum())
    mw = n_matched / max(1, vocab_map.numel()) if matched_weight is None else matched_weight
    uw = 1.0 - mw if unmatched_weight is None else unmatched_weight
    return mw, uw


def hybrid_columns(vocab_map: torch.Tensor, student_vocab: int) -> tuple[torch.Tensor, ...]:
    """The hybrid's column sets, int64 on ``vocab_map``'s device: ``(s_matched, t_matched,
    s_free, t_free)``, the matched teacher ids' student ids, the matched teacher ids, the
    student ids no teacher id maps to, the unmatched teacher ids."""
    t_matched = torch.nonzero(vocab_map >= 0).squeeze(1)
    s_matched = vocab_map[t_matched]
    s_free_mask = torch.ones(student_vocab, dtype=torch.bool, device=vocab_map.device)
    s_free_mask[s_matched] = False
    return (s_matched, t_matched, torch.nonzero(s_free_mask).squeeze(1),
            torch.nonzero(vocab_map < 0).squeeze(1))


# ---- row math -------------------------------------------------------------------------------
def merged_rows(z2: torch.Tensor, rows_base: torch.Tensor, rows_scalar: torch.Tensor,
                tokens: torch.Tensor, group: torch.Tensor, temperature: float,
                dtype: torch.dtype) -> torch.Tensor:
    """[G, V]: softmax(z / T) at each base row times the product of its group's clamped
    scalars ``max(p[row, token], EPS)``."""
    G = rows_base.numel()
    rows = torch.cat([rows_base, rows_scalar])
    p = torch.softmax(z2.index_select(0, rows).to(dtype) / temperature, dim=-1)
    base = p[:G]
    if rows_scalar.numel() == 0:
        return base
    scal = p[G:].gather(1, tokens[:, None]).squeeze(1).clamp_min(EPS)
    log_c = torch.zeros(G, dtype=dtype, device=z2.device).index_add(0, group, scal.log())
    return base * log_c.exp()[:, None]


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[G]: sum_r |sort_desc(p)_r - sort_desc(q)_r|, the narrower side zero-padded."""
    ps = p.sort(dim=-1, descending=True).values
    qs = q.sort(dim=-1, descending=True).values
    w = min(ps.shape[-1], qs.shape[-1])
    out = (ps[:, :w] - qs[:, :w]).abs().sum(-1)
    if ps.shape[-1] > w:
        out = out + ps[:, w:].abs().sum(-1)
    if qs.shape[-1] > w:
        out = out + qs[:, w:].abs().sum(-1)
    return out


def generalized_jsd(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """[G]: GOLD's generalized JSD on raw (unnormalised) probabilities, student ``p``, teacher
    ``q``, both clamped at EPS (``GOLDTrainer.generalized_jsd_loss(logits_are_probs=True)``):
    beta 0 is KL(q || p), beta 1 KL(p || q), else beta KL(q || m) + (1 - beta) KL(p || m),
    m = (1 - beta) p + beta q, each KL summed over the columns."""
    lp = p.clamp_min(EPS).log()
    lq = q.clamp_min(EPS).log()
    if beta == 0.0:
        return (lq.exp() * (lq - lp)).sum(-1)
    if beta == 1.0:
        return (lp.exp() * (lp - lq)).sum(-1)
    b = torch.tensor(beta, dtype=lp.dtype, device=lp.device)
    lm = torch.logsumexp(torch.stack([lp + torch.log1p(-b), lq + torch.log(b)]), dim=0)
    return beta * (lq.exp() * (lq - lm)).sum(-1) + (1 - beta) * (lp.exp() * (lp - lm)).sum(-1)


def group_losses(zs2: torch.Tensor, zt2: torch.Tensor, groups: AlignedGroups, *,
                 vocab_map: torch.Tensor | None, matched_weight: float | None,
                 unmatched_weight: float | None, beta: float, student_temperature: float,
                 teacher_temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """[G]: each group's term of its sample's numerator (divide by the sample's group count)."""
    s, t = groups.student, groups.teacher
    P = merged_rows(zs2, s.base_rows, s.scalar_rows, s.scalar_tokens, s.scalar_group,
                    student_temperature, dtype)
    with torch.no_grad():
        Q = merged_rows(zt2, t.base_rows, t.scalar_rows, t.scalar_tokens, t.scalar_group,
                        teacher_temperature, dtype)
    if vocab_map is None:
        return sorted_l1(P, Q)
    mw, uw = hybrid_weights(vocab_map, matched_weight, unmatched_weight)
    s_matched, t_matched, s_free, t_free = hybrid_columns(vocab_map, P.shape[-1])
    out = P.new_zeros(P.shape[0])
    if t_matched.numel():
        out = out + mw * generalized_jsd(P[:, s_matched], Q[:, t_matched], beta)
    if s_free.numel() and t_free.numel():
        out = out + uw * sorted_l1(P[:, s_free], Q[:, t_free])
    return out


# ---- the public loss ------------------------------------------------------------------------
def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_labels: torch.Tensor,
    student_input_ids: torch.Tensor,
    teacher_input_ids: torch.Tensor,
    student_offsets: torch.Tensor | None = None,
    teacher_offsets: torch.Tensor | None = None,
    *,
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
) -> torch.Tensor:
    """Cross-tokenizer distillation loss (ULD; GOLD's hybrid when ``vocab_map`` is given).

    Semantics of TRL 1.16's ``ULDLoss`` with ``use_extended_uld = offsets given``,
    ``uld_token_merge_strategy = merge``, ``uld_use_hybrid_loss = vocab_map is not None``:

    * per sample, the answer span (labels != ``ignore_index``, minus the EOS skips) of both
      sides is aligned (byte spans from the offsets, else position by position), each group's
      row is merged (``"observed"``: first position's row; ``"bayesian"``: logits one position
      earlier, last position's row) times the group's other tokens' probabilities clamped at
      1e-8, with ``p = softmax(logits / T)`` on each side;
    * plain: sum over groups of the L1 distance of the rows sorted in descending order
      (zero-padded to the wider vocabulary), over the number of groups;
    * hybrid: ``vocab_map[t]`` is the student id of teacher id t or -1; matched columns take
      GOLD's generalized JSD (``beta``) on the raw merged probabilities, unmatched ones the
      sorted L1, each averaged over the sample's groups, weighted ``matched_weight`` (default:
      matched share of the teacher's columns) and ``unmatched_weight`` (default 1 - matched);
    * ``reduction``: "mean" (GOLD's: over samples, a sample without groups counting 0), "sum",
      or "none" ([B]); plus ``ce_weight`` * the token-mean CE of ``student_logits[:, :-1]``
      against ``student_labels[:, 1:]`` (0 when no token is labelled; with "none" each sample
      carries its share, so that the sum of "none" is "sum").

    Returns a 0-dim tensor (``[B]`` for "none"), float32 for half-precision logits. A batch
    without groups gives 0 with zero gradients.
    """
    zs = check_float_tensor("student_logits", student_logits, "[B, L, V]")
    zt = check_float_tensor("teacher_logits", teacher_logits, "[B, L, V]")
    Ts, Tt, beta, dw, cw, matched_weight, unmatched_weight = check_loss_options(
        merge=merge, reduction=reduction, student_temperature=student_temperature,
        teacher_temperature=teacher_temperature, beta=beta,
        distillation_weight=distillation_weight, ce_weight=ce_weight,
        matched_weight=matched_weight, unmatched_weight=unmatched_weight,
        impl=impl, impls=IMPLS, impl_of="uld_loss")
    check_labels(student_labels, zs, teacher_labels, zt, "logits")
    device = zs.device
    check_same_device("student_logits", device, (
        ("teacher_logits", zt), ("student_labels", student_labels),
        ("teacher_labels", teacher_labels), ("student_input_ids", student_input_ids),
        ("teacher_input_ids", teacher_input_ids),
        ("student_offsets", student_offsets), ("teacher_offsets", teacher_offsets)))
    B, _, Vs = zs.shape
    Vt = zt.shape[-1]
    if vocab_map is not None:
        vocab_map = check_vocab_map(vocab_map, Vt, Vs, device)
    groups = align_batch(student_labels, teacher_labels, student_input_ids, teacher_input_ids,
                         student_offsets, teacher_offsets, merge=merge,
                         skip_student_eos=skip_student_eos, skip_teacher_eos=skip_teacher_eos,
                         ignore_index=ignore_index, student_vocab_size=Vs,
                         teacher_vocab_size=Vt, device=device)
    dtype = torch.float64 if zs.dtype == torch.float64 else torch.float32
    # A zero on the student's graph: the result's gradient path when nothing else is.
    anchor = zs.reshape(-1)[:0].sum().to(dtype)
    zs2 = zs.reshape(-1, Vs)
    per_sample = torch.zeros(B, dtype=dtype, device=device) + anchor
    if groups.num_groups:
        g = group_losses(zs2, zt.detach().reshape(-1, Vt), groups, vocab_map=vocab_map,
                         matched_weight=matched_weight, unmatched_weight=unmatched_weight,
                         beta=beta, student_temperature=Ts, teacher_temperature=Tt, dtype=dtype)
        per_sample = per_sample.index_add(0, groups.sample, g)
        per_sample = per_sample / groups.groups_per_sample.clamp_min(1).to(dtype)
    per_sample = dw * per_sample
    ce_rows = _ce_per_sample(zs, student_labels, ignore_index, dtype) if cw > 0 else None
    if reduction == "none":
        return per_sample if ce_rows is None else per_sample + cw * ce_rows
    total = per_sample.sum()
    if reduction == "mean":
        total = total / max(B, 1)
    return total if ce_rows is None else total + cw * ce_rows.sum()


def _ce_per_sample(zs: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """[B]: each sample's summed next-token CE over the batch's number of labelled tokens."""
    B, L, V = zs.shape
    target = labels[:, 1:]
    valid = target != ignore_index
    where = torch.nonzero(valid)
    n = where.shape[0]
    out = zs.reshape(-1)[:0].sum().to(dtype) + torch.zeros(B, dtype=dtype, device=zs.device)
    if n == 0:
        return out
    y = target[valid].long()
    if int(y.min()) < 0 or int(y.max()) >= V:
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise ValueError(f"student_labels has label {bad}, outside [0, {V}) and not "
                         f"ignore_index ({ignore_index})")
    rows = zs[:, :-1][valid].to(dtype)
    ce = F.cross_entropy(rows, y, reduction="none")
    return out.index_add(0, where[:, 0], ce) / n
