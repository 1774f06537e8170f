"""Drop-in integrations: KDTrainer (transformers.Trainer) on tiny models, TRL GKD example."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from kdkernels import reference
from tests._train_helpers import VOCAB, tiny_pair, token_stream
from tests._trl_helpers import prompts, tiny_tokenizer

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


@pytest.mark.parametrize("scaled", [False, True])
def test_kdtrainer_loss_matches_materialised_logits(tmp_path, scaled):
    student, teacher = tiny_pair()
    scale, t_scale = (4.0, 0.5) if scaled else (1.0, 1.0)
    if scaled:  # Granite's and Falcon-H1's attributes (LlamaForCausalLM itself ignores them)
        student.config.logits_scaling = 1 / scale
        teacher.config.lm_head_multiplier = t_scale
    opts = dict(divergence="jsd", beta=0.3, temperature=1.5, kd_weight=0.6, ce_weight=0.4)
    trainer, data = _trainer(tmp_path, student, teacher, **opts)
    batch = {k: torch.stack([d[k] for d in data[:3]]) for k in data[0]}
    loss = trainer.compute_loss(student, batch)
    zs = scale * student(input_ids=batch["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        zt = t_scale * teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    ref = reference.reference_kd_loss(zs, zt, batch["labels"][:, 1:], **opts)
    # fp32 models; 1e-5 covers the fp32 GEMM summation order at this size.
    torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-6)


def test_kdtrainer_takes_alpha_and_refuses_what_it_sets(tmp_path):
    """Every loss option reaches KDTrainer (alpha among them, once missing from its
    signature); those it sets itself per batch are refused by name."""
    student, teacher = tiny_pair()
    opts = dict(divergence="alpha", alpha=0.3, temperature=1.5, kd_weight=0.7, ce_weight=0.3)
    trainer, data = _trainer(tmp_path, student, teacher, **opts)
    assert (trainer.kd_options.divergence, trainer.kd_options.alpha) == ("alpha", 0.3)
    batch = {k: torch.stack([d[k] for d in data[:3]]) for k in data[0]}
    loss = trainer.compute_loss(student, batch)
    zs = student(input_ids=batch["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        zt = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    ref = reference.reference_kd_loss(zs, zt, batch["labels"][:, 1:], **opts)
    torch.testing.assert_close(loss.double(), ref["loss"], rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="KDTrainer sets reduction itself"):
        _trainer(tmp_path, student, teacher, reduction="sum")
    with pytest.raises(ValueError, match="alpha must be in the open interval"):
        _trainer(tmp_path, student, teacher, alpha=1.0)


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


def _gkd_example():
    path = Path(__file__).resolve().parent.parent / "examples" / "trl_gkd.py"
    spec = importlib.util.spec_from_file_location("trl_gkd_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gkd_trainer(tmp_path, module, student, teacher, beta=0.5, lmbda=1.0, bf16=False):
    from datasets import Dataset

    tok = tiny_tokenizer(padding_side="right")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if not loop.last %} "
                         "{% endif %}{% endfor %}{% if add_generation_prompt %} {% endif %}")
    data = [{"messages": [{"role": "user", "content": p["prompt"]},
                          {"role": "assistant", "content": "w5 w9 w11"}]} for p in prompts(8)]
    args = module.GKDConfig(output_dir=str(tmp_path), max_steps=2, lmbda=lmbda, beta=beta,
                            max_new_tokens=4, per_device_train_batch_size=2, learning_rate=1e-2,
                            report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                            logging_steps=1, bf16=bf16)
    return module.FusedGKDTrainer(model=student, teacher_model=teacher, args=args,
                                  processing_class=tok, train_dataset=Dataset.from_list(data))


def test_trl_gkd_example_finds_gkd_in_current_trl():
    module = _gkd_example()
    pytest.importorskip("trl", reason="trl>=1.16 is in the dev extra")
    from trl.experimental.gkd import GKDTrainer

    assert module.TRL_MISSING is None and module.GKDTrainer is GKDTrainer


def test_trl_gkd_example_says_which_trl_lacks_what(monkeypatch):
    module = _gkd_example()
    trl = pytest.importorskip("trl", reason="trl>=1.16 is in the dev extra")
    monkeypatch.setitem(sys.modules, "trl.experimental.gkd", None)
    monkeypatch.delattr(trl, "GKDTrainer", raising=False)
    _, _, why = module._find_gkd()
    assert why.startswith(f"trl {trl.__version__} is installed but has no GKDTrainer")
    assert "trl.experimental.gkd" in why and "needs trl>=1.16" in why


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_gkd_example_loss_matches_gkd(tmp_path, beta):
    module = _gkd_example()
    pytest.importorskip("trl", reason="trl>=1.16 is in the dev extra")
    student, teacher = tiny_pair()
    trainer = _gkd_trainer(tmp_path, module, student, teacher, beta=beta)
    ids = token_stream(3 * 16).reshape(3, 16)
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4], labels[1, :6], labels[2, :3] = -100, -100, -100  # prompts of three lengths
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for num_items in (None, torch.tensor(29)):
        losses, grads = [], []
        for compute in (module.FusedGKDTrainer.compute_loss, module.GKDTrainer.compute_loss):
            student.zero_grad()
            loss = compute(trainer, student, dict(inputs), num_items_in_batch=num_items)
            loss.backward()
            losses.append(loss.detach())
            grads.append({k: p.grad.clone() for k, p in student.named_parameters()})
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)
        for name, grad in grads[0].items():
            torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_trl_gkd_example_trains_on_policy(tmp_path):
    module = _gkd_example()
    pytest.importorskip("trl", reason="trl>=1.16 is in the dev extra")
    student, teacher = tiny_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = _gkd_trainer(tmp_path, module, student, teacher, lmbda=1.0, bf16=True).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())
