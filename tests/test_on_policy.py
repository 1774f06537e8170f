"""On-policy and sequence-level KD in the trainer: --on-policy 0 is today's trainer, seeded
generation, completion-only loss, num_items over ragged micro-batches, resume, --seq-kd, and
every bad option refused by name."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kdkernels import reference
from kdkernels.train import pipeline
from kdkernels.train.batches import completions, windows
from kdkernels.train.objectives.dense import DistillObjective, teacher_outputs
from kdkernels.train.on_policy import batch_source, generation
from kdkernels.train.runtime import checkpoint, distributed, loop, metrics
from kdkernels.train.sources import prompts
from tests._train_helpers import VOCAB, tiny_config, tiny_pair, token_stream

EOS = 0  # build_llama's eos/pad id
OPTS = dict(divergence="reverse_kl", temperature=1.0, kd_weight=0.7, ce_weight=0.3)


def _stage(tmp_path, name, cfg, resume=None, gen=None):
    student, teacher = tiny_pair()
    obj = DistillObjective(student, divergence=cfg.divergence, temperature=cfg.temperature,
                           kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight)
    return loop.Stage(name, obj, teacher, cfg.max_steps, cfg.lr, cfg.seed, tmp_path / name,
                      resume=resume, fingerprint=cfg.fingerprint(), generation=gen)


def _run(tmp_path, name, cfg, **kw):
    stage = _stage(tmp_path, name, cfg, **kw)
    held = windows.eval_batches(token_stream(seed=9), 2, 16, 1)
    summary = loop.train(stage, cfg, token_stream(), held, distributed.World())
    return stage, summary


def _losses(path):
    return [r["loss"] for r in metrics.read(path / "metrics.jsonl") if "loss" in r]


def _weights(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _gen(cfg):
    return batch_source.OnPolicy(cfg, eos_id=EOS, pad_id=EOS)


# The pre-change trainer (commit be07e64, before these options existed) on this tiny run:
# step losses as float.hex. Bit-identical on the machine that recorded them (and so were the
# `kdk distill --preset smoke` metrics and weights); compared to 1e-6 here because CPU GEMMs
# round differently on other machines (AVX2 vs AVX-512).
_PRE_CHANGE_LOSSES = ["0x1.25f4b10000000p+1", "0x1.2139080000000p+1", "0x1.165a990000000p+1",
                      "0x1.0e6a180000000p+1"]


def test_on_policy_zero_is_the_pre_change_trainer(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=4, grad_accum=2)
    assert not batch_source.enabled(cfg)
    assert cfg.fingerprint() == {k: v for k, v in cfg.fingerprint().items()
                                 if k not in cfg.GENERATION_FIELDS}  # old runs still resume
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: CPU sums depend on the thread count
    try:
        stage, summary = _run(tmp_path, "zero", cfg)
    finally:
        torch.set_num_threads(threads)
    want = [float.fromhex(h) for h in _PRE_CHANGE_LOSSES]
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "zero")), torch.tensor(want),
                               rtol=1e-6, atol=0)
    assert "gen_s" not in summary and "gen_s" not in metrics.read(
        tmp_path / "zero" / "metrics.jsonl")[0]


def test_a_coin_that_never_fires_changes_nothing_bit_for_bit(tmp_path):
    # LAMBDA > 0 builds the generator and flips its coins, but with a probability this small
    # no micro-batch is replaced: losses, weights and the global RNG must equal LAMBDA = 0
    # exactly (the coins and samples never draw from the trainer's RNG).
    cfg0 = tiny_config(tmp_path, max_steps=4, grad_accum=2)
    cfg1 = dataclasses.replace(cfg0, on_policy=1e-12)
    torch.manual_seed(5)
    a, _ = _run(tmp_path, "a", cfg0)
    rng_a = torch.get_rng_state()
    torch.manual_seed(5)
    b, summary = _run(tmp_path, "b", cfg1, gen=_gen(cfg1))
    assert summary["generated_batches"] == 0
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert torch.equal(_weights(a.objective.student), _weights(b.objective.student))
    assert torch.equal(rng_a, torch.get_rng_state())


def test_generation_is_seeded_reproducible_and_leaves_the_global_rng_alone():
    student, _ = tiny_pair(seq=32)
    prompt = token_stream(4 * 8)[: 4 * 8].reshape(4, 8)
    mask = torch.ones_like(prompt)
    s = generation.Sampling(12, temperature=1.3, top_p=0.9)
    before = torch.get_rng_state()
    a = generation.sample(student, prompt, mask, s, seed=7, eos_id=None, pad_id=EOS)
    assert torch.equal(before, torch.get_rng_state())
    b = generation.sample(student, prompt, mask, s, seed=7, eos_id=None, pad_id=EOS)
    c = generation.sample(student, prompt, mask, s, seed=8, eos_id=None, pad_id=EOS)
    assert a.shape == (4, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert student.training  # eval mode only while generating
    g = batch_source.OnPolicy(tiny_config(".", on_policy=0.5), eos_id=EOS, pad_id=EOS)
    coins = [g.source(0, step, m) for step in range(40) for m in range(2)]
    assert coins == [g.source(0, step, m) for step in range(40) for m in range(2)]
    assert 20 < coins.count("student") < 60 and set(coins) == {"student", None}


def _ragged(prompt_len=6, widths=(5, 2, 7, 1), new=7, seed=0):
    """Prompts of the token stream plus hand-made completions: row r has EOS at column
    widths[r] - 1 (a row of width `new` has none), then junk that must be masked."""
    n = len(widths)
    prompt = token_stream(n * prompt_len, seed=seed)[: n * prompt_len].reshape(n, prompt_len)
    g = torch.Generator().manual_seed(seed)
    comp = torch.randint(1, VOCAB, (n, new), generator=g)
    for r, w in enumerate(widths):
        if w < new:
            comp[r, w - 1] = EOS
    return completions.assemble(prompt, torch.ones_like(prompt), comp, EOS, EOS)


def test_assemble_keeps_the_completion_through_its_first_eos():
    b = _ragged()
    kept = b["labels"] != completions.IGNORE_INDEX
    # Targets at sequence positions >= 6 (labels index >= 5), up to the first EOS.
    assert kept.sum(1).tolist() == [5, 2, 7, 1]
    assert not kept[:, :5].any()
    assert b["attention_mask"].sum(1).tolist() == [11, 8, 13, 7]
    assert (b["labels"][kept] == b["input_ids"][:, 1:][kept]).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == EOS).all()
    # The EOS is itself a target (the student must learn to stop).
    assert int(b["labels"][1, 6]) == EOS and int(b["labels"][3, 5]) == EOS


def test_prompt_and_after_eos_positions_get_no_loss_and_no_gradient(monkeypatch):
    student, teacher = tiny_pair()
    b = _ragged()
    held = {}
    real = completions.masked_hidden_states

    def keep_grad(model, ids, mask):
        h = real(model, ids, mask)
        if h.requires_grad:
            h.retain_grad()
            held["h"] = h
        return h

    monkeypatch.setattr(completions, "masked_hidden_states", keep_grad)
    obj = DistillObjective(student, **OPTS)
    th, tw = teacher_outputs(teacher, b["input_ids"], b["attention_mask"])
    n = float(completions.kept_tokens(b))
    out = obj(b["input_ids"], th, tw, n, b["labels"], b["attention_mask"])
    out.loss.backward()
    grad = held["h"].grad[:, :-1].abs().sum(-1)
    kept = b["labels"] != completions.IGNORE_INDEX
    assert (grad[~kept] == 0).all() and (grad[kept] > 0).all()
    # The loss is the oracle's over the completion tokens only (padded-batch positions).
    with torch.no_grad():
        pos = completions.position_ids(b["attention_mask"])
        zs = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     position_ids=pos).logits[:, :-1]
        zt = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     position_ids=pos).logits[:, :-1]
    ref = reference.reference_kd_loss(zs[kept], zt[kept], b["labels"][kept], num_items=n,
                                      **OPTS)
    torch.testing.assert_close(out.loss.double(), ref["loss"], rtol=1e-5, atol=1e-6)
    assert int(out.n_tokens) == int(n) == 15


def test_left_padded_prompts_see_the_positions_generation_used():
    # A prompt left-padded in a batch gives the same hidden states over its real tokens as
    # the same sequence alone, unpadded.
    student, _ = tiny_pair()
    ids, mask = completions.left_pad([[5, 6, 7, 8, 9], [3, 4]], EOS)
    comp = torch.tensor([[11, 12, 13], [21, 22, 23]])
    b = completions.assemble(ids, mask, comp, EOS, EOS)
    with torch.no_grad():
        padded = completions.masked_hidden_states(student, b["input_ids"], b["attention_mask"])
        alone = completions.masked_hidden_states(student, torch.tensor([[3, 4, 21, 22, 23]]),
                                                 torch.ones(1, 5, dtype=torch.int64))
    torch.testing.assert_close(padded[1, 3:], alone[0], rtol=1e-5, atol=1e-6)
    assert (padded[1, :3] == 0).all()
    assert (b["labels"][1] != completions.IGNORE_INDEX).sum() == 3


def test_num_items_over_ragged_micro_batches_equals_one_big_batch():
    student, teacher = tiny_pair()
    b = _ragged(widths=(5, 2, 7, 1, 3))
    obj = DistillObjective(student, **OPTS)
    th, tw = teacher_outputs(teacher, b["input_ids"], b["attention_mask"])
    n = float(completions.kept_tokens(b))
    obj(b["input_ids"], th, tw, n, b["labels"], b["attention_mask"]).loss.backward()
    big = torch.cat([p.grad.reshape(-1) for p in student.parameters()])
    student.zero_grad()
    for part in (slice(0, 1), slice(1, 3), slice(3, 5)):  # unequal kept counts per part
        obj(b["input_ids"][part], th[part], tw, n, b["labels"][part],
            b["attention_mask"][part]).loss.backward()
    got = torch.cat([p.grad.reshape(-1) for p in student.parameters()])
    torch.testing.assert_close(got, big, rtol=1e-5, atol=1e-7)


def _fake_sample(widths_by_call):
    """A stand-in for generation.sample: ragged completions, narrower than max_new_tokens
    when every row stopped (as HF generate returns them)."""
    calls = []

    def fake(model, prompt_ids, prompt_mask, sampling, *, seed, eos_id, pad_id, bf16=False,
             synced=False):
        widths = widths_by_call[len(calls) % len(widths_by_call)]
        calls.append(model)
        g = torch.Generator().manual_seed(seed % 2**31)
        width = min(max(widths), sampling.max_new_tokens)
        comp = torch.randint(1, VOCAB, (prompt_ids.shape[0], width), generator=g)
        for r, w in enumerate(widths):
            if w <= width:
                comp[r, w - 1:] = eos_id
        return comp

    return fake, calls


def test_the_loop_counts_only_kept_completion_tokens_across_micro_batches(tmp_path,
                                                                          monkeypatch):
    fake, calls = _fake_sample([(3, 8), (1, 2)])
    monkeypatch.setattr(generation, "sample", fake)
    seen = []
    real = DistillObjective.forward

    def spy(self, ids, th, tw, num_items, labels=None, attention_mask=None):
        seen.append((num_items, None if labels is None else
                     int((labels != completions.IGNORE_INDEX).sum())))
        return real(self, ids, th, tw, num_items, labels, attention_mask)

    monkeypatch.setattr(DistillObjective, "forward", spy)
    cfg = tiny_config(tmp_path, max_steps=1, grad_accum=2, on_policy=1.0)
    _, summary = _run(tmp_path, "n", cfg, gen=_gen(cfg))
    assert [kept for _, kept in seen] == [3 + 8, 1 + 2]
    assert {n for n, _ in seen} == {14.0}
    assert summary["generated_batches"] == 2 and summary["gen_tokens"] == 14


def test_resume_mid_run_equals_uninterrupted(tmp_path):
    # Real sampling from the student being trained, half the micro-batches on-policy.
    cfg = tiny_config(tmp_path, max_steps=6, grad_accum=2, on_policy=0.5, prompt_len=6,
                      save_every=3, divergence="reverse_kl")
    full, summary = _run(tmp_path, "full", cfg, gen=_gen(cfg))
    assert 0 < summary["generated_batches"] < 12
    ckpt = checkpoint.latest(tmp_path / "full")
    assert ckpt.name == "step-000006"
    mid = tmp_path / "full" / "checkpoints" / "step-000003"
    resumed, _ = _run(tmp_path, "full", cfg, resume=mid, gen=_gen(cfg))
    assert torch.equal(_weights(full.objective.student), _weights(resumed.objective.student))
    assert len(_losses(tmp_path / "full")) == 6
    again, _ = _run(tmp_path, "again", cfg, gen=_gen(cfg))  # and a rerun is identical too
    assert torch.equal(_weights(full.objective.student), _weights(again.objective.student))


@pytest.mark.parametrize("lam,want", [(0.0, {"teacher"}), (1.0, {"student"}),
                                      (0.5, {"student", "teacher"})])
def test_seq_kd_uses_teacher_samples(tmp_path, monkeypatch, lam, want):
    fake, calls = _fake_sample([(4, 9)])
    monkeypatch.setattr(generation, "sample", fake)
    cfg = tiny_config(tmp_path, max_steps=4, grad_accum=2, seq_kd=True, on_policy=lam)
    stage, summary = _run(tmp_path, "s", cfg, gen=_gen(cfg))
    names = {id(stage.objective.student): "student", id(stage.teacher): "teacher"}
    assert {names[id(m)] for m in calls} == want
    assert summary["generated_batches"] == 8  # seq-KD: every micro-batch is generated


def test_seq_kd_batches_are_the_teachers_own_generate_output():
    student, teacher = tiny_pair(seq=32)
    cfg = tiny_config(".", seq_kd=True, prompt_len=6, max_new_tokens=5)
    g = _gen(cfg)
    batch = {"input_ids": token_stream(2 * 16)[:32].reshape(2, 16)}
    (out,), stats = g.replace([batch], seed=3, step=1, rank=0, student=student, teacher=teacher)
    seed = generation.key_seed("on-policy sample", 3, 1, 0, 0)
    want = generation.sample(teacher, batch["input_ids"][:, :6],
                             torch.ones(2, 6, dtype=torch.int64), g.sampling, seed=seed,
                             eos_id=EOS, pad_id=EOS)
    assert torch.equal(out["input_ids"][:, 6:6 + want.shape[1]]
                       .masked_fill(out["attention_mask"][:, 6:] == 0, -1),
                       want.masked_fill(out["attention_mask"][:, 6:] == 0, -1))
    assert stats.batches == 1 and stats.tokens == int(completions.kept_tokens(out))


@pytest.mark.parametrize("kw,match", [
    (dict(on_policy=1.5), "--on-policy must be a probability in"),
    (dict(on_policy=-0.1), "--on-policy must be a probability in"),
    (dict(on_policy=float("nan")), "--on-policy must be a probability in"),
    (dict(prompt_len=16), "--prompt-len 16 must be shorter than --seq-len 16"),
    (dict(prompt_len=0), "--prompt-len must be a positive integer"),
    (dict(max_new_tokens=0), "--max-new-tokens must be a positive integer"),
    (dict(max_new_tokens=-3), "--max-new-tokens must be a positive integer"),
    (dict(gen_temperature=0.0), "--gen-temperature must be > 0"),
    (dict(gen_temperature=-1.0), "--gen-temperature must be > 0"),
    (dict(gen_top_p=0.0), r"--gen-top-p must be in \(0, 1\]"),
    (dict(gen_top_p=1.01), r"--gen-top-p must be in \(0, 1\]"),
    (dict(prompts="p.jsonl"), "--prompts is only read by on-policy"),
])
def test_bad_options_raise_naming_the_option(tmp_path, kw, match):
    cfg = tiny_config(tmp_path, **kw)
    with pytest.raises(ValueError, match=match):
        batch_source.check_options(cfg)
    with pytest.raises(ValueError, match=match):  # the whole run refuses before any work
        pipeline.run(cfg)


def test_generated_batches_must_fit_the_models_and_need_a_teacher(tmp_path):
    cfg = tiny_config(tmp_path, on_policy=1.0, max_new_tokens=40)
    student, teacher = tiny_pair()
    with pytest.raises(ValueError, match="--max-new-tokens = 48 .*max_position_embeddings=16"):
        _gen(cfg).check_models(student, teacher)
    with pytest.raises(ValueError, match="need a teacher model"):
        _gen(cfg).check_models(student, None)
    with pytest.raises(ValueError, match="--teacher-cache run has none"):
        pipeline.run(dataclasses.replace(cfg, max_new_tokens=None), teacher_cache=str(tmp_path))


def test_prompts_file_records_and_errors(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("<abcdefghijklmnopqrstuvwxyz ")}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<", pad_token="<")
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "abc"}) + "\n\n" + json.dumps({"prompt": "hello"}))
    assert prompts.load(str(good), tok) == [[1, 2, 3], [8, 5, 12, 12, 15]]
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(ValueError, match="c.jsonl:1 holds chat 'messages' but the tokenizer"):
        prompts.load(str(chat), tok)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    assert prompts.load(str(chat), tok) == [[8, 9, 27]]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="b.jsonl:1: each record needs a string 'prompt'"):
        prompts.load(str(bad), tok)
    with pytest.raises(ValueError, match="is not a file"):
        prompts.load(str(tmp_path / "missing.jsonl"), tok)
    # Drawn, end-truncated to --prompt-len and left-padded per micro-batch.
    cfg = tiny_config(tmp_path, on_policy=1.0, prompt_len=4, max_new_tokens=3)
    g = batch_source.OnPolicy(cfg, eos_id=0, pad_id=0, prompts=prompts.load(str(good), tok))
    ids, mask = g._prompts({"input_ids": torch.zeros(6, 16, dtype=torch.int64)}, 0, 0, 0, 0)
    rows = {tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask, strict=True)}
    assert rows <= {(1, 2, 3), (5, 12, 12, 15)} and ids.shape == (6, max(map(len, rows)))
