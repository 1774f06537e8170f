"""The trainer reads each model's logit scale (models.logit_transform): the fused objective, the
naive baseline, the top-k objective, the held-out CE and the teacher cache all apply it."""

from __future__ import annotations

import torch

from kdkernels import reference
from kdkernels.cache.scoring import Head, topk_rows
from kdkernels.hf import models
from kdkernels.train.objectives.dense import DistillObjective, teacher_outputs
from kdkernels.train.objectives.topk import TopKObjective
from kdkernels.train.runtime.evaluation import heldout_ce
from tests._train_helpers import tiny_pair, token_stream

OPTS = dict(divergence="forward_kl", temperature=1.5, kd_weight=0.7, ce_weight=0.3)


def _scaled_pair():
    # Llama models carrying Granite's / Cohere's config attributes: LlamaForCausalLM ignores
    # them, so the expected logits below apply them by hand.
    student, teacher = tiny_pair()
    student.config.logits_scaling = 0.125  # Granite divides: scale 8
    teacher.config.logit_scale = 6.0  # Cohere multiplies
    return student, teacher


def test_objective_and_naive_baseline_apply_the_scales():
    student, teacher = _scaled_pair()
    assert models.logit_transform(student) == (8.0, None)
    ids = token_stream(3 * 12).reshape(3, 12)
    th, tw = teacher_outputs(teacher, ids)
    scale, cap = models.logit_transform(teacher)
    losses = []
    for baseline in ("fused", "naive"):
        obj = DistillObjective(student, teacher_softcap=cap, teacher_logit_scale=scale,
                               baseline=baseline, **OPTS)
        losses.append(obj(ids, th, tw, num_items=33.0).loss)
    zs = 8.0 * student(input_ids=ids).logits[:, :-1]
    with torch.no_grad():
        zt = 6.0 * teacher(input_ids=ids).logits[:, :-1]
    ref = reference.reference_kd_loss(zs, zt, ids[:, 1:], num_items=33.0, **OPTS)["loss"]
    for loss in losses:
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    unscaled = reference.reference_kd_loss(zs / 8.0, zt / 6.0, ids[:, 1:], num_items=33.0,
                                           **OPTS)["loss"]
    assert not torch.allclose(ref, unscaled, rtol=1e-3)


def test_heldout_ce_applies_the_scale():
    student, _ = _scaled_pair()
    ids = token_stream(2 * 12).reshape(2, 12)
    got = heldout_ce(student, [ids], torch.device("cpu"))
    with torch.no_grad():
        z = 8.0 * student(input_ids=ids).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(got - float(want)) <= 1e-5 * float(want)


def test_topk_objective_and_teacher_cache_apply_the_scales():
    student, teacher = _scaled_pair()
    ids = token_stream(2 * 12).reshape(2, 12)
    with torch.no_grad():
        hidden = models.hidden_states(teacher, ids)[0]
        full = torch.log_softmax(6.0 * teacher(input_ids=ids).logits[0], -1)
    t_ids, t_lps = topk_rows(Head.of(teacher), hidden, 8)
    v, k = full.topk(8, -1)
    assert torch.equal(t_ids, k.to(torch.int32))
    torch.testing.assert_close(t_lps, v, rtol=0, atol=1e-5)

    obj = TopKObjective(student, tail="bucket", kd_weight=1.0, ce_weight=0.0)
    t_ids = t_ids.long().unsqueeze(0).expand(2, -1, -1)
    t_lps = t_lps.unsqueeze(0).expand(2, -1, -1)
    got = obj(ids, t_ids, t_lps, num_items=22.0).loss
    student.config.logits_scaling = 1.0
    plain = TopKObjective(student, tail="bucket", kd_weight=1.0, ce_weight=0.0)
    assert not torch.allclose(got, plain(ids, t_ids, t_lps, num_items=22.0).loss, rtol=1e-3)
