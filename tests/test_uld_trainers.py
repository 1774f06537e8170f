"""Cross-tokenizer distillation in the trainers: KDTrainer(teacher_tokenizer=...) and the GOLD
drop-in (kdkernels.integrations.gold.FusedGOLDTrainer), on two tiny Llamas whose byte-level BPE
tokenizers (300 and 420 entries, teacher head padded to 424 rows) are trained here, on accented,
CJK and emoji prompt/completion text.

Tolerances: the models are float32. The fused loss computes the same float32 logits (one GEMM
per gathered row instead of one for the whole batch: the same dot products of D <= 48 terms,
possibly summed in another order, a few ulp), then softmax, merge and the sorted L1 / JSD in
float32 as uld_loss and TRL's ULDLoss do on the materialised logits; what differs is the order
of sums of a few hundred terms per row, which moves the loss by ~1e-7 relative. 1e-5 relative
(as tests/test_uld_parity.py for float32) has room and still catches a wrong term; the student
gradients (through the backbone) are held to the same bound against their largest element.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdkernels import uld_loss
from kdkernels.uld import build_vocab_map

from ._uld_helpers import (
    COMPLETIONS,
    PROMPTS,
    VS,
    VT,
    one_thread,  # noqa: F401 (the fixture)
    rel_err,
    tokenizers,
)

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1")
pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]


def _models():
    from kdkernels.train.config import ModelSize
    from kdkernels.train.sources.tiny_llama import build_llama

    s_tok, t_tok = tokenizers()
    torch.manual_seed(5)
    student = build_llama(ModelSize(32, 1, 2, 64), VS, 128, eos_id=s_tok.eos_token_id)
    teacher = build_llama(ModelSize(48, 2, 2, 96), VT, 128, eos_id=t_tok.eos_token_id)
    teacher.config.tie_word_embeddings = False  # an untied teacher head of VT > 420 rows
    teacher.lm_head.weight = torch.nn.Parameter(teacher.lm_head.weight.detach().clone() * 3)
    return student, teacher


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                save_strategy="no", logging_steps=1, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def _kd_trainer(tmp_path, student, teacher, data=RECORDS, **opts):
    from kdkernels.integrations.hf import KDTrainer

    s_tok, t_tok = tokenizers()
    return KDTrainer(model=student, teacher_model=teacher, teacher_tokenizer=t_tok,
                     processing_class=s_tok, args=_args(tmp_path), train_dataset=data, **opts)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _check_against(ref: torch.Tensor, loss: torch.Tensor, fused: dict[str, torch.Tensor],
                   student) -> None:
    """The reference loss ``ref`` (its backward run here) matches ``loss`` and the student's
    gradients matched ``fused`` (taken with ``_grads`` after ``loss.backward()``)."""
    ref.backward()
    assert ref.item() > 0
    assert rel_err(loss, ref) <= 1e-5
    expected = _grads(student)
    assert fused.keys() == expected.keys()
    for name, g in expected.items():
        assert rel_err(fused[name], g) <= 1e-5, name


CASES = [
    dict(cross_tokenizer="uld", merge="observed"),
    dict(cross_tokenizer="hybrid", merge="bayesian", beta=0.3, student_temperature=1.5,
         teacher_temperature=0.7, ce_weight=0.3, distillation_weight=0.8, skip_teacher_eos=False),
]


@pytest.mark.parametrize("opts", CASES, ids=["uld-observed", "hybrid-bayesian"])
def test_kdtrainer_loss_and_grads_match_uld_loss_on_logits(tmp_path, opts):
    student, teacher = _models()
    trainer = _kd_trainer(tmp_path, student, teacher, **opts)
    batch = trainer.data_collator(RECORDS)
    assert batch["input_ids"].shape != batch["teacher_input_ids"].shape  # two tokenizations
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    fused = _grads(student)
    assert not any(p.grad is not None for p in teacher.parameters())

    s_tok, t_tok = tokenizers()
    vocab_map = build_vocab_map(s_tok, t_tok, VT) if opts["cross_tokenizer"] == "hybrid" else None
    if vocab_map is not None:
        assert torch.equal(trainer.cross_loss.vocab_map, vocab_map)
    zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        zt = teacher(input_ids=batch["teacher_input_ids"],
                     attention_mask=batch["teacher_attention_mask"]).logits
    kw = {k: v for k, v in opts.items() if k != "cross_tokenizer"}
    ref = uld_loss(zs, zt, batch["labels"], batch["teacher_labels"], batch["input_ids"],
                   batch["teacher_input_ids"], batch["student_offsets"],
                   batch["teacher_offsets"], vocab_map=vocab_map, **kw)
    _check_against(ref, loss, fused, student)


def test_kdtrainer_trains_across_tokenizers(tmp_path):
    """A few Trainer steps from a datasets.Dataset of text records (its prompt/completion
    columns survive remove_unused_columns): the student moves, the teacher does not."""
    datasets = pytest.importorskip("datasets")
    student, teacher = _models()
    before_s = copy.deepcopy(student.state_dict())
    before_t = copy.deepcopy(teacher.state_dict())
    data = datasets.Dataset.from_list(RECORDS)
    trainer = _kd_trainer(tmp_path, student, teacher, data=data, eval_dataset=data)
    assert trainer.uld_options.cross_tokenizer == "hybrid"  # > half of the teacher's BPE maps
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < float("inf") for x in losses)
    assert 0 < trainer.evaluate()["eval_loss"] < float("inf")
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before_s.items())


def test_kdtrainer_gradient_accumulation_is_one_big_batch(tmp_path):
    """The loss is GOLD's per-sample mean: two micro-batches of two samples accumulate the
    gradient of the four samples' mean (the Trainer divides each by the accumulation steps)."""
    student, teacher = _models()
    trainer = _kd_trainer(tmp_path, student, teacher)
    trainer.current_gradient_accumulation_steps = 2
    for half in (RECORDS[:2], RECORDS[2:]):
        batch = trainer.data_collator(half)
        trainer.training_step(trainer.model, batch, num_items_in_batch=batch["labels"].numel())
    accumulated = _grads(student)
    trainer.compute_loss(student, trainer.data_collator(RECORDS)).backward()
    for name, g in _grads(student).items():
        assert rel_err(accumulated[name], g) <= 1e-5, name


def test_kdtrainer_cross_tokenizer_refusals(tmp_path):
    from kdkernels.integrations.hf import KDTrainer

    student, teacher = _models()
    s_tok, _ = tokenizers()
    with pytest.raises(TypeError, match="temperature are options of the shared-vocabulary"):
        _kd_trainer(tmp_path, student, teacher, temperature=2.0)
    with pytest.raises(TypeError, match="merge apply to cross-tokenizer distillation only"):
        KDTrainer(model=student, teacher_model=teacher, processing_class=s_tok,
                  args=_args(tmp_path), train_dataset=RECORDS, merge="bayesian")
    with pytest.raises(ValueError, match="cross_tokenizer must be one of"):
        _kd_trainer(tmp_path, student, teacher, cross_tokenizer="kl")
    teacher.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="caps its logits"):
        _kd_trainer(tmp_path, student, teacher)


# ---- TRL's GOLDTrainer with the fused ULD loss ------------------------------------------------
GOLD_CASES = [
    dict(uld_token_merge_strategy="observed"),
    dict(uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=True, beta=0.3,
         uld_student_temperature=1.5, uld_teacher_temperature=0.7, uld_crossentropy_weight=0.3,
         uld_skip_student_eos=False),
]


def _gold(tmp_path, student, teacher, fused=True, **cfg):
    datasets = pytest.importorskip("datasets")
    gold = pytest.importorskip("kdkernels.integrations.gold")
    if gold.TRL_MISSING is not None:
        pytest.skip(gold.TRL_MISSING)
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    s_tok, t_tok = tokenizers()
    t_dir = tmp_path / "teacher_tokenizer"
    t_tok.save_pretrained(str(t_dir))
    cfg.setdefault("lmbda", 0.0)  # off-policy: TRL's collator and dataset text
    args = GOLDConfig(output_dir=str(tmp_path / "gold"), use_uld_loss=True,
                      teacher_tokenizer_name_or_path=str(t_dir), max_steps=2,
                      per_device_train_batch_size=2, gradient_accumulation_steps=1,
                      learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False,
                      save_strategy="no", logging_steps=1, disable_tqdm=True, max_length=96,
                      max_completion_length=8, **cfg)
    cls = gold.FusedGOLDTrainer if fused else GOLDTrainer
    return cls(model=student, teacher_model=teacher, args=args, processing_class=s_tok,
               train_dataset=datasets.Dataset.from_list(RECORDS))


@pytest.mark.parametrize("cfg", GOLD_CASES, ids=["uld-observed", "hybrid-bayesian"])
def test_fused_gold_loss_matches_trl_uld_loss(tmp_path, cfg):
    """One GOLD batch (TRL's datasets, collator and teacher inputs): FusedGOLDTrainer's loss
    and student gradients equal GOLDTrainer's own with TRL's ULDLoss, and the student's LM
    head emitted hidden states, not logits, while the fused loss ran."""
    from kdkernels.integrations.gold import FusedULDLossFn

    student, teacher = _models()
    trainer = _gold(tmp_path, student, teacher, **cfg)
    assert isinstance(trainer.uld_loss_fn, FusedULDLossFn) and trainer.fused_heads
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    widths = []
    hook = student.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[-1]))
    loss = trainer.compute_loss(trainer.model, batch)
    hook.remove()
    assert widths == [student.config.hidden_size]
    loss.backward()
    fused = _grads(student)

    fused_fn, trainer.uld_loss_fn = trainer.uld_loss_fn, trainer.trl_uld_loss_fn  # TRL's own
    ref = trainer.compute_loss(trainer.model, batch)
    _check_against(ref, loss, fused, student)
    # return_outputs=True keeps real logits in the outputs: then our loss runs on them
    trainer.uld_loss_fn = fused_fn
    on_logits, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert outputs.logits.shape[-1] == VS
    assert rel_err(on_logits, ref) <= 1e-5


@pytest.mark.parametrize("lmbda", [0.0, 1.0], ids=["off-policy", "on-policy"])
def test_fused_gold_trains(tmp_path, lmbda):
    """Two GOLDTrainer steps (no vLLM; on-policy: the student generates with transformers,
    its head untouched outside compute_loss) with the fused loss: finite losses, the student
    moves, the teacher does not."""
    student, teacher = _models()
    before_s = copy.deepcopy(student.state_dict())
    before_t = copy.deepcopy(teacher.state_dict())
    trainer = _gold(tmp_path, student, teacher, uld_use_hybrid_loss=True, lmbda=lmbda)
    trainer.train()
    assert trainer._buffered_on_policy == [lmbda == 1.0]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < float("inf") for x in losses)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before_s.items())
    assert "forward" not in vars(student.lm_head)  # the heads are restored
