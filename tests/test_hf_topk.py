"""TopKKDTrainer (transformers.Trainer from teacher top-K log-probs in the batches) and its
collator, on tiny Llama models: the loss against the float64 top-k reference on materialised
logits, training from a kdkernels teacher cache and from a datasets.Dataset of uneven rows,
and the refusals."""

from __future__ import annotations

import pytest
import torch

from kdkernels.cache import TeacherCache, write_cache
from tests._topk_reference import reference_topk_loss
from tests._train_helpers import VOCAB, tiny_pair, token_stream

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1")

SEQ, K = 16, 6


def _teacher_topk(teacher, input_ids: torch.Tensor, k: int = K):
    """The teacher's top-k log-probs at every position (position t: the token after t), its
    logits sharpened x 8 so that the randomly initialised teacher is far from uniform."""
    with torch.no_grad():
        lp = torch.log_softmax(8.0 * teacher(input_ids=input_ids).logits.double(), -1)
    top = lp.topk(k, -1)
    return top.indices, top.values.float()


def _examples(teacher, n: int = 8):
    ids = token_stream(n * SEQ).reshape(n, SEQ)
    t_ids, t_lp = _teacher_topk(teacher, ids)
    return [{"input_ids": i, "teacher_ids": a, "teacher_logprobs": b}
            for i, a, b in zip(ids, t_ids, t_lp, strict=True)]


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[],
                use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def _trainer(tmp_path, student, data, **kd):
    from kdkernels.integrations.hf import TopKKDTrainer

    return TopKKDTrainer(model=student, args=_args(tmp_path), train_dataset=data, **kd)


@pytest.mark.parametrize("opts", [
    dict(tail="bucket", kd_weight=0.7, ce_weight=0.3, temperature=1.5),
    dict(tail="renormalize", divergence="jsd", beta=0.3),
    dict(tail="zero", scale_by_t2=False, temperature=2.0),
])
def test_loss_matches_the_reference_on_materialised_logits(tmp_path, opts):
    student, teacher = tiny_pair()
    data = _examples(teacher)
    trainer = _trainer(tmp_path, student, data, **opts)
    batch = trainer.data_collator(data[:3])
    batch["labels"][0, :4] = -100  # a prompt that is not trained on
    batch["teacher_ids"][1, 2, :2] = -1  # empty slots
    loss = trainer.compute_loss(student, batch)
    zs = student(input_ids=batch["input_ids"]).logits[:, :-1].double()
    ref, _, _ = reference_topk_loss(zs, batch["teacher_ids"][:, :-1],
                                    batch["teacher_logprobs"][:, :-1],
                                    batch["labels"][:, 1:], **opts)
    # fp32 models: 1e-5 covers the fp32 GEMMs' summation order at this size
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.model.embed_tokens.weight.grad.abs().sum() > 0


def test_num_items_makes_two_halves_one_batch(tmp_path):
    """Gradient accumulation: the Trainer's num_items_in_batch normalises each micro-batch by
    the kept tokens of all of them, so the halves sum to the whole batch's mean."""
    student, teacher = tiny_pair()
    data = _examples(teacher, 4)
    trainer = _trainer(tmp_path, student, data, kd_weight=0.6, ce_weight=0.4)
    whole = trainer.data_collator(data)
    halves = [trainer.data_collator(data[:2]), trainer.data_collator(data[2:])]
    num = sum(int((h["labels"][:, 1:] != -100).sum()) for h in halves)
    parts = sum(trainer.compute_loss(student, h, num_items_in_batch=num) for h in halves)
    torch.testing.assert_close(parts, trainer.compute_loss(student, whole), rtol=1e-5,
                               atol=1e-7)


def test_trains_from_a_teacher_cache(tmp_path):
    student, teacher = tiny_pair()
    ids = token_stream(8 * SEQ).reshape(8, SEQ)
    t_ids, t_lp = _teacher_topk(teacher, ids)
    write_cache(tmp_path / "cache", ids.int(), t_ids.int(), t_lp.bfloat16(),
                meta={"tokenizer_hash": "t", "teacher": "tiny"}, shard_size=3)
    cache = TeacherCache(tmp_path / "cache")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = _trainer(tmp_path / "out", student, cache, kd_weight=0.8, ce_weight=0.2)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)


def test_loss_falls_on_a_dataset_of_uneven_rows(tmp_path):
    """A datasets.Dataset (lists, rows of different L and K): the teacher columns survive
    remove_unused_columns and the collator pads them; twenty steps lower the KD loss."""
    datasets = pytest.importorskip("datasets")
    student, teacher = tiny_pair()
    rows = []
    for i, ex in enumerate(_examples(teacher, 8)):
        length, k = SEQ - (i % 3) * 2, K - i % 2
        rows.append({"input_ids": ex["input_ids"][:length].tolist(),
                     "teacher_ids": ex["teacher_ids"][:length, :k].tolist(),
                     "teacher_logprobs": ex["teacher_logprobs"][:length, :k].tolist(),
                     "source": f"row {i}"})  # an unused column, removed by the Trainer
    ds = datasets.Dataset.from_list(rows)
    from kdkernels.integrations.hf import TopKKDTrainer

    trainer = TopKKDTrainer(model=student, args=_args(tmp_path, max_steps=20,
                                                      gradient_accumulation_steps=1,
                                                      per_device_train_batch_size=4),
                            train_dataset=ds)
    batch = trainer.data_collator([ds[0], ds[1]])
    assert batch["teacher_ids"].shape == (2, SEQ, K)
    assert (batch["teacher_ids"][1, :, K - 1] == -1).all()  # row 1 has K - 1 slots
    eval_batch = trainer.data_collator([ds[i] for i in range(8)])
    with torch.no_grad():
        first = float(trainer.compute_loss(student, eval_batch))
    trainer.train()
    with torch.no_grad():
        last = float(trainer.compute_loss(student, eval_batch))
    assert last < 0.7 * first, (first, last)


def test_collator_pads_and_checks():
    from kdkernels.integrations.hf import TopKCollator

    col = TopKCollator(pad_token_id=3)
    a = {"input_ids": [5, 6, 7], "teacher_ids": [[1, 2], [3, 4], [5, 6]],
         "teacher_logprobs": [[-0.5, -1.0]] * 3, "labels": [-100, 6, 7]}
    b = {"input_ids": [8], "teacher_ids": [[9, 10, 11]], "teacher_logprobs": [[-1.0] * 3]}
    out = col([a, b])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["teacher_ids"][0, :, 2].tolist() == [-1, -1, -1]
    assert out["teacher_ids"][1, 1:].eq(-1).all() and out["teacher_logprobs"][1, 1:].eq(0).all()
    with pytest.raises(ValueError, match="example 1 has no teacher_logprobs"):
        col([a, {"input_ids": [1], "teacher_ids": [[1]]}])
    with pytest.raises(ValueError, match=r"example 0: teacher_ids must be \[L, K\] with L = 3"):
        col([dict(a, teacher_ids=[[1, 2]])])
    with pytest.raises(ValueError, match="example 0: labels must be"):
        col([dict(a, labels=[1])])
    with pytest.raises(ValueError, match="empty list"):
        col([])


def test_options_the_trainer_sets_are_refused_the_rest_reach_it(tmp_path):
    student, teacher = tiny_pair()
    data = _examples(teacher, 2)
    trainer = _trainer(tmp_path, student, data, tail="zero", alpha=0.3, skew=0.2)
    opts = trainer.kd_options
    assert (opts.tail, opts.alpha, opts.skew) == ("zero", 0.3, 0.2)
    assert (opts.reduction, opts.return_components) == ("mean", True)
    with pytest.raises(TypeError, match="TopKKDTrainer sets student_softcap itself"):
        _trainer(tmp_path, student, data, student_softcap=3.0)
    with pytest.raises(TypeError, match="teacher_logit_scale"):  # no top-k option
        _trainer(tmp_path, student, data, teacher_logit_scale=2.0)


def test_refusals(tmp_path):
    from kdkernels.integrations.hf import TopKKDTrainer

    student, teacher = tiny_pair()
    data = _examples(teacher, 2)
    with pytest.raises(ValueError, match="not defined under tail='zero'"):
        _trainer(tmp_path, student, data, tail="zero", divergence="jsd")
    with pytest.raises(ValueError, match="use kdkernels.integrations.hf.KDTrainer"):
        TopKKDTrainer(model=student, teacher_model=teacher, args=_args(tmp_path),
                      train_dataset=data)
    trainer = _trainer(tmp_path, student, data)
    batch = trainer.data_collator(data)
    with pytest.raises(ValueError, match="this batch has no teacher_logprobs"):
        trainer.compute_loss(student, {k: v for k, v in batch.items()
                                       if k != "teacher_logprobs"})
    batch["teacher_ids"][0, 3, 0] = VOCAB + 4
    with pytest.raises(ValueError, match="teacher_ids must be < V"):
        trainer.compute_loss(student, batch)
