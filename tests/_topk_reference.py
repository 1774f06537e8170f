"""A float64 reference of the top-k loss, written from the formulas of docs/sparse_teachers.md and
independent of kdkernels/sparse: it materialises the full student log-softmax, forms each
tail's distributions explicitly and lets autograd differentiate it."""

from __future__ import annotations

import math

import torch

REST_EPS = 1e-6  # docs/sparse_teachers.md: the teacher's rest is clamped below at 1e-6


def _outcome_div(student, teacher, divergence, beta, skew, alpha):
    """A divergence between two distributions given as log-probs on the same outcomes, with
    the dense loss's definitions (reference.py's conventions, written out again here)."""
    p, q = student.exp(), teacher.exp()
    if divergence == "jsd" and beta in (0.0, 1.0):  # TRL: jsd at beta 0 / 1 is the KL
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        return (q * (teacher - student)).sum()
    if divergence == "reverse_kl":
        return (p * (student - teacher)).sum()
    if divergence == "jsd":
        log_m = torch.log(beta * q + (1 - beta) * p)
        return beta * (q * (teacher - log_m)).sum() + (1 - beta) * (p * (student - log_m)).sum()
    if divergence == "skew_forward_kl":
        return (q * (teacher - torch.log(skew * q + (1 - skew) * p))).sum()
    if divergence == "skew_reverse_kl":
        return (p * (student - torch.log((1 - skew) * q + skew * p))).sum()
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum()
    if divergence == "alpha":
        return (1 - (q**alpha * p ** (1 - alpha)).sum()) / (alpha * (1 - alpha))
    raise ValueError(divergence)


def _row_div(logp_row, ids, lq, tail, divergence, temperature, vocab, params):
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
        return _outcome_div(lpr, lqr, divergence, **params)
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
    return _outcome_div(student, teacher, divergence, **params)


def reference_topk_loss(student_logits, teacher_ids, teacher_logprobs, labels=None, *,
                        tail="bucket", divergence="forward_kl", beta=0.5, skew=0.1,
                        alpha=0.5, temperature=1.0,
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
                                    temperature, vocab,
                                    dict(beta=beta, skew=skew, alpha=alpha)))
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
