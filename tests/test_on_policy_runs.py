"""On-policy KD end to end: `kdk distill` with users' own HF models, --prompts and --bf16;
2-rank gloo DDP/FSDP; the on-policy preset's smoke version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdkernels import cli
from kdkernels.train.batches import windows
from kdkernels.train.config import PRESETS, ModelSize, preset
from kdkernels.train.objectives.dense import DistillObjective
from kdkernels.train.on_policy import batch_source
from kdkernels.train.on_policy import preset as on_policy_preset
from kdkernels.train.runtime import checkpoint, distributed, loop, metrics
from kdkernels.train.sources.tiny_llama import build_llama
from kdkernels.train.sources.tokenizer import train_bpe
from tests._train_helpers import join_gloo, spawn_gloo, tiny_config, tiny_pair, token_stream

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A teacher and a student directory (save_pretrained, shared BPE) and a --data dir."""
    root = tmp_path_factory.mktemp("hf")
    tok = train_bpe([TEXT * 40], 300)
    for name, size, seed in (("teacher", ModelSize(48, 2, 2, 96), 1),
                             ("student", ModelSize(32, 1, 2, 64), 2)):
        torch.manual_seed(seed)
        build_llama(size, len(tok), 64, eos_id=tok.eos_token_id).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = root / "data"
    data.mkdir()
    for i in range(30):
        (data / f"f{i}.py").write_text(TEXT * (3 + i % 4) + f"# file {i}\n")
    return root / "teacher", root / "student", data


def test_user_models_with_prompts_file_and_bf16(tmp_path, hf_models, monkeypatch):
    monkeypatch.setenv("KDKERNELS_CACHE", str(tmp_path / "cache"))
    teacher, student, data = hf_models
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                 ("def add(a, b):", "class", "    return a + b\n\nclass P")))
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
            "--on-policy", "0.5", "--prompts", str(prompts), "--prompt-len", "6",
            "--max-new-tokens", "10", "--gen-temperature", "0.9", "--gen-top-p", "0.95",
            "--seq-len", "32", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "3",
            "--warmup-steps", "1", "--eval-every", "0", "--threads", "1", "--bf16",
            "-o", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    report = (out / "report.md").read_text()
    assert "Generation vs training" in report and "generation" in report
    assert "on-policy: micro-batches student-generated with probability 0.5" in report
    kd = json.loads((out / "results.json").read_text())["results"]["kd"]
    assert kd["generated_batches"] > 0 and kd["gen_tokens_per_s"] > 0
    assert kd["train_tokens_per_s"] > 0 and kd["heldout_ce"] == kd["heldout_ce"]  # not NaN
    recs = [r for r in metrics.read(out / "kd" / "metrics.jsonl") if "loss" in r]
    assert all({"gen_tokens_per_s", "train_tokens_per_s"} <= set(r) for r in recs)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    # --resume with other generation options is refused; with the same ones it continues.
    bad = [a if a != "0.9" else "0.8" for a in argv] + ["--resume", "--max-steps", "4"]
    assert cli.main(bad) == 2
    assert cli.main(argv + ["--resume", "--max-steps", "4"]) == 0
    assert checkpoint.latest(out / "kd").name == "step-000004"


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, parallel: str) -> None:
    world = join_gloo(rank, world_size, port)
    cfg = tiny_config(Path(out_dir), max_steps=3, grad_accum=2, on_policy=0.5, prompt_len=6)
    student, teacher = tiny_pair()
    obj = DistillObjective(student, divergence="reverse_kl", kd_weight=0.5, ce_weight=0.5)
    gen = batch_source.OnPolicy(cfg, eos_id=0, pad_id=0, synced=parallel == "fsdp")
    stage = loop.Stage("ddp", obj, teacher, 3, 1e-2, 0, Path(out_dir) / "ddp", generation=gen)
    held = windows.eval_batches(token_stream(seed=9), 2, 16, 1)
    summary = loop.train(stage, cfg, token_stream(), held, world, parallel)
    flat = torch.cat([p.detach().reshape(-1) for p in checkpoint.full_state_dict(student)
                      .values()])
    torch.save({"w": flat, "generated": summary["generated_batches"]},
               Path(out_dir) / f"{parallel}-rank{rank}.pt")
    distributed.shutdown()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_gloo_on_policy_ranks_end_identical(tmp_path, parallel):
    spawn_gloo(_ddp_worker, 2, str(tmp_path), parallel)
    r0 = torch.load(tmp_path / f"{parallel}-rank0.pt")
    r1 = torch.load(tmp_path / f"{parallel}-rank1.pt")
    assert torch.equal(r0["w"], r1["w"])
    # Both ranks generate in the same micro-batches (the coin ignores the rank), counted
    # over the world.
    assert r0["generated"] == r1["generated"] > 0


def test_on_policy_presets_build():
    assert set(on_policy_preset.PRESET_NAMES) <= set(PRESETS)
    for name in ("on-policy", "on-policy-smoke"):
        cfg = preset(name)
        assert batch_source.lengths(cfg)[0] < cfg.seq_len
        batch_source.check_options(cfg)


@pytest.mark.slow
def test_on_policy_smoke_preset_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKERNELS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["distill", "--preset", "on-policy-smoke", "-o", str(out), "--no-progress",
            "--threads", "1"]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res) == {"teacher", "kd", "kd-reverse_kl", "on-policy"}
    for name in ("kd", "kd-reverse_kl", "on-policy"):
        assert 0 < res[name]["heldout_ce"] < 10 and 0 < res[name]["teacher_nll"] < 10
    assert res["on-policy"]["generated_batches"] > 0 and res["on-policy"]["on_policy"] == 0.5
    assert "gen_s" not in res["kd"]
    # the same initialisation: the two off-policy students differ only by their divergence
    assert res["kd"]["params"] == res["on-policy"]["params"]
    report = (out / "report.md").read_text()
    assert "teacher NLL of own samples" in report and "on-policy vs kd-reverse_kl" in report
    assert cli.main(argv + ["--teacher", "x"]) == 2  # the preset owns its models
