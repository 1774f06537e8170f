"""Drop-in integrations: KDTrainer (transformers.Trainer) on tiny models, TRL GKD example."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kdkernels import reference
from tests._train_helpers import VOCAB, tiny_pair, token_stream

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1")


def _trainer(tmp_path, student, teacher, **kd):
    from transformers import TrainingArguments

    from kdkernels.integrations.hf import KDTrainer

    ids = token_stream(8 * 16).reshape(8, 16)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not trained on
    data = [{"input_ids": i, "labels": y, "attention_mask": torch.ones_like(i)}
            for i, y in zip(ids, labels, strict=True)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1,
                             disable_tqdm=True)
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                        **kd)
    return trainer, data


def test_kdtrainer_loss_matches_materialised_logits(tmp_path):
    student, teacher = tiny_pair()
    opts = dict(divergence="jsd", beta=0.3, temperature=1.5, kd_weight=0.6, ce_weight=0.4)
    trainer, data = _trainer(tmp_path, student, teacher, **opts)
    batch = {k: torch.stack([d[k] for d in data[:3]]) for k in data[0]}
    loss = trainer.compute_loss(student, batch)
    zs = student(input_ids=batch["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        zt = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    ref = reference.reference_kd_loss(zs, zt, batch["labels"][:, 1:], **opts)
    # fp32 models; 1e-5 covers the fp32 GEMM summation order at this size.
    torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-6)


def test_kdtrainer_trains_two_steps(tmp_path):
    student, teacher = tiny_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer, _ = _trainer(tmp_path, student, teacher, temperature=2.0, kd_weight=0.5,
                          ce_weight=0.5)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.embed_tokens.weight" in changed and len(changed) == len(before)
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training


def test_kdtrainer_rejects_mismatched_vocab(tmp_path):
    student, _ = tiny_pair()
    _, teacher = tiny_pair(vocab=VOCAB + 5)
    with pytest.raises(ValueError, match="vocab"):
        _trainer(tmp_path, student, teacher)


def test_trl_gkd_example(tmp_path):
    path = Path(__file__).resolve().parent.parent / "examples" / "trl_gkd.py"
    spec = importlib.util.spec_from_file_location("trl_gkd_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.TRL_MISSING:
        pytest.skip(module.TRL_MISSING)
    from trl.trainer.utils import GKDTrainer  # noqa: F401 (present with trl)

    student, teacher = tiny_pair()
    ids = token_stream(2 * 16).reshape(2, 16)
    labels = ids.clone()
    labels[:, :4] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "prompts": ids[:, :4]}
    fake = module.FusedGKDTrainer.__new__(module.FusedGKDTrainer)
    fake.beta, fake.teacher_model = 0.5, teacher.eval()

    class _Acc:
        @staticmethod
        def unwrap_model(m):
            return m

    fake.accelerator = _Acc()
    loss = module.FusedGKDTrainer.compute_loss(fake, student, inputs)
    zs = student(input_ids=ids).logits[:, 3:-1]
    with torch.no_grad():
        zt = teacher(input_ids=ids).logits[:, 3:-1]
    ref = reference.reference_kd_loss(zs, zt, labels[:, 4:], divergence="jsd", beta=0.5)
    torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-6)
