"""The reference trainer: loss against materialised logits, grad accumulation, bit-for-bit
resume after Ctrl-C, bad input, 2-rank gloo DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdkernels import reference
from kdkernels.hf import models
from kdkernels.options import option_fields
from kdkernels.train import config
from kdkernels.train.batches import windows
from kdkernels.train.objectives import from_config
from kdkernels.train.objectives.dense import DistillObjective, teacher_outputs
from kdkernels.train.runtime import checkpoint, distributed, loop, metrics
from kdkernels.train.runtime.run_dir import prepare_output
from kdkernels.train.sources import training_data
from tests._train_helpers import VOCAB, tiny_config, tiny_pair, token_stream

ROOT = Path(__file__).resolve().parent.parent
OPTS = dict(divergence="forward_kl", temperature=2.0, kd_weight=0.7, ce_weight=0.3)


def _flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("softcap", [None, 7.5])
def test_loss_and_grads_match_materialised_logits(softcap):
    # The trainer's path (base hidden states + head -> fused loss) against the models' own
    # LM-head forward (full logits, softcap applied) and the float64 oracle; fp32 models,
    # so 1e-5 covers the fp32 GEMM/reduction-order differences at this size.
    student, teacher = tiny_pair()
    teacher.config.final_logit_softcapping = softcap
    ids = token_stream(3 * 16)[: 3 * 16].reshape(3, 16)
    ids[0, 5] = VOCAB - 1
    obj = DistillObjective(student, teacher_softcap=softcap, **OPTS)
    th, tw = teacher_outputs(teacher, ids)
    out = obj(ids, th, tw, num_items=45.0)
    out.loss.backward()
    got_grads = _flat_grads(student)
    student.zero_grad()

    zs = student(input_ids=ids).logits[:, :-1]
    with torch.no_grad():
        zt = teacher(input_ids=ids).logits[:, :-1]
        if softcap is not None:  # LlamaForCausalLM ignores the Gemma-2 softcap field
            zt = softcap * torch.tanh(zt / softcap)
    ref = reference.reference_kd_loss(zs, zt, ids[:, 1:], num_items=45.0, **OPTS)
    ref["loss"].backward()
    assert teacher.training is False
    torch.testing.assert_close(out.loss.double(), ref["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grads, _flat_grads(student), rtol=1e-4, atol=1e-6)
    assert int(out.n_tokens) == 45


@pytest.mark.parametrize("ce_only", [False, True])
def test_naive_baseline_matches_the_fused_objective(ce_only):
    # --baseline naive materialises the logits and runs the fp32 reference loss: the same
    # numbers as the fused path (fp32 models: GEMM/reduction-order differences only).
    student, teacher = tiny_pair()
    ids = token_stream(2 * 12)[: 2 * 12].reshape(2, 12)
    th, tw = (None, None) if ce_only else teacher_outputs(teacher, ids)
    runs = []
    for baseline in ("fused", "naive"):
        student.zero_grad()
        out = DistillObjective(student, baseline=baseline, **OPTS)(ids, th, tw, num_items=22.0)
        out.loss.backward()
        runs.append((out, _flat_grads(student).clone()))
    (fused, g_fused), (naive, g_naive) = runs
    for a, b in ((fused.loss, naive.loss), (fused.kd, naive.kd), (fused.ce, naive.ce)):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fused, g_naive, rtol=1e-4, atol=1e-6)
    assert int(fused.n_tokens) == int(naive.n_tokens) == 22
    with pytest.raises(ValueError, match="--baseline must be 'fused' or 'naive'"):
        DistillObjective(student, baseline="liger")


def test_grad_accumulation_with_num_items_equals_one_big_batch():
    student, teacher = tiny_pair()
    ids = token_stream(4 * 16).reshape(4, 16)
    obj = DistillObjective(student, **OPTS)
    th, tw = teacher_outputs(teacher, ids)
    obj(ids, th, tw, num_items=60.0).loss.backward()
    big = _flat_grads(student)
    student.zero_grad()
    for part in (slice(0, 1), slice(1, 4)):  # unequal micro-batches
        obj(ids[part], th[part], tw, num_items=60.0).loss.backward()
    torch.testing.assert_close(_flat_grads(student), big, rtol=1e-5, atol=1e-7)


def _stage(tmp_path, name, cfg, resume=None):
    student, teacher = tiny_pair()
    obj = DistillObjective(student, temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                           ce_weight=cfg.ce_weight)
    return loop.Stage(name, obj, teacher, cfg.max_steps, cfg.lr, cfg.seed, tmp_path / name,
                      resume=resume, fingerprint=cfg.fingerprint())


def test_ctrl_c_saves_and_resume_is_bit_for_bit(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, max_steps=6, grad_accum=2)
    tokens, held = token_stream(), windows.eval_batches(token_stream(seed=9), 2, 16, 1)
    world = distributed.World()
    full = _stage(tmp_path, "full", cfg)
    loop.train(full, cfg, tokens, held, world)

    # Ctrl-C while step 3 runs: the loop finishes that step, saves, and stops.
    real = windows.train_batch

    def batch_then_interrupt(*a, step, micro=0, **kw):
        if step == 2 and micro == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, step=step, micro=micro, **kw)

    monkeypatch.setattr(windows, "train_batch", batch_then_interrupt)
    cut = _stage(tmp_path, "cut", cfg)
    summary = loop.train(cut, cfg, tokens, held, world)
    assert summary["interrupted"] and summary["steps"] == 3
    monkeypatch.setattr(windows, "train_batch", real)
    ckpt = checkpoint.latest(tmp_path / "cut")
    assert ckpt is not None and ckpt.name == "step-000003"
    resumed = _stage(tmp_path, "cut", cfg, resume=ckpt)
    loop.train(resumed, cfg, tokens, held, world)
    a = dict(full.objective.student.named_parameters())
    b = dict(resumed.objective.student.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from uninterrupted"
    assert not torch.equal(a["model.norm.weight"], torch.ones_like(a["model.norm.weight"]))
    steps = [r["step"] for r in metrics.read(tmp_path / "cut" / "metrics.jsonl")
             if "loss" in r]
    assert steps == list(range(1, 7))


def test_resume_from_another_config_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=2)
    tokens, held = token_stream(), windows.eval_batches(token_stream(seed=9), 2, 16, 1)
    loop.train(_stage(tmp_path, "a", cfg), cfg, tokens, held, distributed.World())
    other = tiny_config(tmp_path, max_steps=2, temperature=3.0)
    stage = _stage(tmp_path, "a", other, resume=checkpoint.latest(tmp_path / "a"))
    with pytest.raises(ValueError, match="different configuration.*temperature"):
        loop.train(stage, other, tokens, held, distributed.World())


def test_bad_inputs_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="holds no text files"):
        training_data.prepare(tiny_config(tmp_path), str(tmp_path), None, distributed.World())
    student, teacher = tiny_pair(seq=16)
    with pytest.raises(ValueError, match="--seq-len 64 .*max_position_embeddings=16"):
        models.check_seq_len(student, 64, "student")
    other, _ = tiny_pair(vocab=VOCAB + 3)
    with pytest.raises(ValueError, match="vocab"):
        models.check_pair(other, teacher)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    with pytest.raises(ValueError, match="--overwrite"):
        prepare_output(tmp_path / "run", overwrite=False, resume=False,
                       world=distributed.World(), fingerprint={})


def test_the_config_carries_every_loss_option_once():
    names = {f.name for f in option_fields()} - config.SET_BY_THE_TRAINER
    assert set(config.LOSS_OPTIONS) == names
    cfg = tiny_config(".", divergence="alpha", alpha=0.3, skew=0.2)
    assert cfg.loss_options() == {**{n: getattr(cfg, n) for n in names}, "impl": cfg.impl}
    assert {"alpha", "skew", "scale_by_t2"} <= set(cfg.fingerprint())
    obj = from_config.distill_objective(cfg, tiny_pair()[0], None)
    assert obj.options["alpha"] == 0.3 and obj.options["divergence"] == "alpha"


def test_a_run_written_before_an_option_existed_resumes_at_its_default(tmp_path):
    cfg = tiny_config(tmp_path)
    old = {k: v for k, v in cfg.fingerprint().items() if k not in ("skew", "alpha")}
    world = distributed.World()
    prepare_output(tmp_path / "run", overwrite=False, resume=False, world=world,
                   fingerprint=old)
    prepare_output(tmp_path / "run", overwrite=False, resume=True, world=world,
                   fingerprint=cfg.fingerprint())
    with pytest.raises(ValueError, match="different configuration.*skew: run 0.1 vs now 0.3"):
        prepare_output(tmp_path / "run", overwrite=False, resume=True, world=world,
                       fingerprint=tiny_config(tmp_path, skew=0.3).fingerprint())


# A loss option added to KDOptions (and so to the top-k options) before the trainer loads;
# spies in place of the two losses record the options each objective passes.
_NEW_OPTION = """
import dataclasses, json
import torch
from kdkernels import options
from kdkernels.sparse import options as sparse_options

gamma = ("gamma", float, dataclasses.field(default=0.25))
options.KDOptions = dataclasses.make_dataclass(
    "KDOptions", [gamma], bases=(options.KDOptions,), frozen=True)
sparse_options.TopKOptions = dataclasses.make_dataclass(
    "TopKOptions", [gamma], bases=(sparse_options.TopKOptions,), frozen=True)

from kdkernels.train.config import TrainConfig
from kdkernels.train.objectives import dense, from_config, topk
from tests._train_helpers import tiny_config, tiny_pair, token_stream

cfg = tiny_config(".", gamma=0.75)
assert cfg.fingerprint()["gamma"] == 0.75 and TrainConfig.from_dict(cfg.to_dict()) == cfg
seen = {}

class Seen(Exception):
    pass

def spy(name):
    def loss(*args, **kwargs):
        seen[name] = kwargs
        raise Seen
    return loss

dense.fused_linear_kd_loss = spy("DistillObjective")
topk.fused_linear_topk_kd_loss = spy("TopKObjective")
student, teacher = tiny_pair()
ids = token_stream(32).reshape(2, 16)
th, tw = dense.teacher_outputs(teacher, ids)
t_ids, t_lps = torch.zeros(2, 16, 4, dtype=torch.long), torch.full((2, 16, 4), -2.0)
for step in (lambda: from_config.distill_objective(cfg, student, teacher)(ids, th, tw, 30.0),
             lambda: from_config.topk_objective(cfg, student)(ids, t_ids, t_lps, 30.0)):
    try:
        step()
    except Seen:
        pass
print(json.dumps({name: kwargs.get("gamma") for name, kwargs in seen.items()}))
"""


def test_a_new_loss_option_reaches_both_objectives():
    out = subprocess.run([sys.executable, "-c", _NEW_OPTION], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    passed = json.loads(out.stdout.strip().splitlines()[-1])
    assert passed == {"DistillObjective": 0.75, "TopKObjective": 0.75}


def test_train_batches_are_deterministic_and_vary():
    t = token_stream()
    a = windows.train_batch(t, 3, 16, seed=1, step=5, micro=1, rank=0)
    assert torch.equal(a, windows.train_batch(t, 3, 16, seed=1, step=5, micro=1, rank=0))
    assert not torch.equal(a, windows.train_batch(t, 3, 16, seed=1, step=5, micro=1, rank=1))
    assert not torch.equal(a, windows.train_batch(t, 3, 16, seed=2, step=5, micro=1, rank=0))


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, parallel: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world = distributed.init("cpu")
    cfg = tiny_config(Path(out_dir), max_steps=3)
    student, teacher = tiny_pair()
    obj = DistillObjective(student, temperature=2.0, kd_weight=0.5, ce_weight=0.5)
    stage = loop.Stage("ddp", obj, teacher, 3, 1e-2, 0, Path(out_dir) / "ddp")
    held = windows.eval_batches(token_stream(seed=9), 2, 16, 1)
    loop.train(stage, cfg, token_stream(), held, world, parallel)
    flat = torch.cat([p.detach().reshape(-1) for p in checkpoint.full_state_dict(student)
                      .values()])
    torch.save(flat, Path(out_dir) / f"{parallel}-rank{rank}.pt")
    distributed.shutdown()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_gloo_ranks_end_identical(tmp_path, parallel):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), parallel), nprocs=2, join=True)
    r0 = torch.load(tmp_path / f"{parallel}-rank0.pt")
    r1 = torch.load(tmp_path / f"{parallel}-rank1.pt")
    student, _ = tiny_pair()
    init = torch.cat([p.reshape(-1) for p in student.state_dict().values()])
    assert torch.equal(r0, r1)
    assert not torch.equal(r0, init)  # it trained
