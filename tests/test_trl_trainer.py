"""KDDistillationTrainer on tiny Llama models built from configs (CPU): a few on-policy steps,
its _compute_loss against TRL's own on the same micro-batch, and the errors without trl."""

from __future__ import annotations

import importlib.metadata
import math
import sys

import pytest
import torch

from kdkernels.integrations import trl as kd_trl
from tests._train_helpers import tiny_pair
from tests._trl_helpers import prompts, tiny_tokenizer

trl = pytest.importorskip("trl", reason="trl>=1.16 is in the dev extra")


def _trainer(tmp_path, student, teacher, *, beta=0.5, temperature=1.0, steps=2, **loss):
    from datasets import Dataset
    from trl import DistillationConfig

    args = DistillationConfig(output_dir=str(tmp_path), max_steps=steps, beta=beta,
                              temperature=temperature, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2, max_completion_length=5,
                              learning_rate=1e-2, logging_steps=1, report_to=[],
                              save_strategy="no", use_cpu=True, disable_tqdm=True, seed=3)
    return kd_trl.KDDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                        train_dataset=Dataset.from_list(prompts(8)),
                                        processing_class=tiny_tokenizer(), **loss)


def test_trains_a_few_on_policy_steps(tmp_path):
    student, teacher = tiny_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = _trainer(tmp_path, student, teacher, beta=0.5, temperature=1.3)
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    assert result.training_loss > 0
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.embed_tokens.weight" in changed
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    logged = [h for h in trainer.state.log_history if "entropy" in h]
    assert logged and all(h["entropy"] is not None and h["entropy"] > 0 for h in logged)


def _micro_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 97, (2, 4), generator=g)
    completion = torch.randint(3, 97, (2, 6), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0  # left padding
    completion_mask = torch.ones_like(completion)
    completion_mask[0, 4:] = 0  # right padding after EOS
    tool_mask = torch.ones_like(completion)
    tool_mask[1, 1:3] = 0  # a tool's output inside the completion
    return {"prompt_ids": prompt, "prompt_mask": prompt_mask, "completion_ids": completion,
            "completion_mask": completion_mask, "tool_mask": tool_mask}


@pytest.mark.parametrize("beta,temperature,num_items,scaled", [
    (0.0, 1.0, None, False), (0.5, 1.7, 13.0, False), (1.0, 0.8, None, False),
    (0.5, 1.3, None, True)])
def test_compute_loss_matches_trl(tmp_path, beta, temperature, num_items, scaled):
    student, teacher = tiny_pair()
    if scaled:  # read from the configs by both TRL and logit_transform
        student.config.logits_scaling = 0.25  # Granite's: divided, scale 4
        teacher.config.logit_scale = 3.0  # Cohere's: multiplied
        teacher.config.final_logit_softcapping = 5.0
    trainer = _trainer(tmp_path, student, teacher, beta=beta, temperature=temperature)
    inputs = _micro_batch()
    n = None if num_items is None else torch.tensor(num_items)
    results = []
    for compute in (kd_trl.KDDistillationTrainer._compute_loss,
                    trl.DistillationTrainer._compute_loss):
        student.zero_grad()
        loss, entropy, valid = compute(trainer, student, inputs, n)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in student.named_parameters()}
        results.append((loss.detach(), entropy, valid, grads))
    (loss, entropy, valid, grads), (t_loss, t_entropy, t_valid, t_grads) = results
    torch.testing.assert_close(loss, t_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(entropy, t_entropy, rtol=1e-5, atol=1e-6)
    assert int(valid) == int(t_valid) == 12 - 2 - 2
    for name, grad in grads.items():
        torch.testing.assert_close(grad, t_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_loss_options_reach_the_loss_and_bad_ones_are_named(tmp_path):
    student, teacher = tiny_pair()
    trainer = _trainer(tmp_path, student, teacher, beta=0.0, temperature=2.0,
                       scale_by_t2=True, ce_weight=0.25, kd_weight=0.75, impl="torch")
    assert trainer.kd_options["scale_by_t2"] and trainer.kd_options["impl"] == "torch"
    loss, _, _ = trainer._compute_loss(student, _micro_batch(), None)
    plain = trl.DistillationTrainer._compute_loss(trainer, student, _micro_batch(), None)[0]
    assert not torch.allclose(loss, plain)
    with pytest.raises(ValueError, match="chunk_size"):
        _trainer(tmp_path, student, teacher, chunk_size=-3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'beta_typo'"):
        _trainer(tmp_path, student, teacher, beta_typo=0.1)
    with pytest.raises(ValueError, match="KDDistillationTrainer needs teacher_model"):
        _trainer(tmp_path, student, None)


def test_import_without_trl_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    found = kd_trl._trl_problem()
    assert f"trl {trl.__version__} is installed but `from trl import DistillationTrainer` " \
           "fails" in found and "trl>=1.16,<2" in found

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert kd_trl._trl_problem().startswith("trl is not installed; KDDistillationTrainer needs "
                                            "trl>=1.16,<2")
    monkeypatch.setattr(kd_trl, "TRL_MISSING", "trl is not installed; ...")
    with pytest.raises(ImportError, match="trl is not installed"):
        kd_trl.KDDistillationTrainer.__init__(object.__new__(kd_trl.KDDistillationTrainer))
