"""A float64 reference of the top-k loss, written from the README's formulas and
independent of kdkernels/sparse: it materialises the full student log-softmax, forms each
tail's distributions explicitly and lets autograd differentiate it."""

from __future__ import annotations

import math

import torch

REST_EPS = 1e-6  # README "Sparse teachers": the teacher's rest is clamped below at 1e-6


def _row_div(logp_row, ids, lq, tail, divergence, temperature, vocab):
    lq = lq.clamp(max=0.0)
    mass = lq.exp().sum()
    lq_t = torch.log(mass) + lq / temperature - torch.logsumexp(lq / temperature, 0)
    q_t = lq_t.exp()
    lp_s = logp_row[ids]
    outside = len(ids) < vocab
    if tail == "zero":
        return (q_t * (lq_t - lp_s)).sum()
    if tail == "renormalize":
        lqr = lq_t - torch.logsumexp(lq_t, 0)
        lpr = lp_s - torch.logsumexp(lp_s, 0)
        if divergence == "forward_kl":
            return (lqr.exp() * (lqr - lpr)).sum()
        return (lpr.exp() * (lpr - lqr)).sum()
    # bucket: K + 1 outcomes
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[ids] = False
    if not outside:
        student, teacher = lp_s, lq_t
    else:
        log_rest_p = torch.logsumexp(logp_row[keep], 0)  # summed directly, never 1 - P
        rest = max(1.0 - float(mass), REST_EPS)
        student = torch.cat([lp_s, log_rest_p[None]])
        teacher = torch.cat([lq_t, torch.tensor([math.log(rest)], dtype=lq_t.dtype)])
    if divergence == "forward_kl":
        return (teacher.exp() * (teacher - student)).sum()
    return (student.exp() * (student - teacher)).sum()


def reference_topk_loss(student_logits, teacher_ids, teacher_logprobs, labels=None, *,
                        tail="bucket", divergence="forward_kl", temperature=1.0,
                        scale_by_t2=True, kd_weight=1.0, ce_weight=0.0, student_softcap=None,
                        student_logit_scale=1.0, ignore_index=-100, reduction="mean",
                        num_items=None):
    """(loss, kd, ce) in float64 from student logits [..., V] (autograd flows to them)."""
    z = student_logits.double()
    lead, vocab = z.shape[:-1], z.shape[-1]
    z = z.reshape(-1, vocab)
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1]).long()
    lps = teacher_logprobs.reshape(-1, teacher_logprobs.shape[-1]).double()
    zx = student_logit_scale * z  # the scale multiplies the raw logits, before the softcap
    zc = zx if student_softcap is None else student_softcap * torch.tanh(zx / student_softcap)
    logp = torch.log_softmax(zc / temperature, -1)
    log_ce = torch.log_softmax(zc, -1)
    flat_labels = None if labels is None else labels.reshape(-1).long()
    kd_rows, ce_rows, keep = [], [], []
    for i in range(z.shape[0]):
        kept = flat_labels is None or int(flat_labels[i]) != ignore_index
        keep.append(kept)
        if not kept:  # 0 with a (zero) gradient path to the logits
            kd_rows.append(z[i].sum() * 0.0)
            ce_rows.append(z[i].sum() * 0.0)
            continue
        valid = ids[i] >= 0
        if not bool(valid.any()):
            kd_rows.append(z[i].sum() * 0.0)
        else:
            kd_rows.append(_row_div(logp[i], ids[i][valid], lps[i][valid], tail, divergence,
                                    temperature, vocab))
        ce_rows.append(-log_ce[i, flat_labels[i]] if flat_labels is not None
                       else z.new_zeros(()))
    kd, ce = torch.stack(kd_rows), torch.stack(ce_rows)
    t2 = temperature**2 if scale_by_t2 else 1.0
    rows = kd_weight * t2 * kd + ce_weight * ce
    n_kept = sum(keep)
    if reduction == "none":
        return rows.reshape(lead), kd.reshape(lead), ce.reshape(lead)
    if reduction == "sum":
        return rows.sum(), kd.sum(), ce.sum()
    norm = num_items if num_items is not None else max(n_kept, 1)
    return rows.sum() / norm, kd.sum() / norm, ce.sum() / norm
