"""The kdk command line: help at every level, info, the pointer left by `kdk bench`, and the
smoke preset end to end (report written, checkpoint loadable by transformers)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from kdkernels import cli, divergences


@pytest.mark.parametrize("argv", [["--help"], ["distill", "--help"]])
def test_help_at_every_level(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert ("distill" in text and "info" in text) if argv == ["--help"] else "--kd-weight" in text


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "distill" in capsys.readouterr().out


def test_info_lists_backends(capsys):
    assert cli.main(["info", "--no-cuda-build"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out


def test_bench_is_gone_and_points_to_the_script(capsys):
    assert cli.main(["bench", "--shape", "S1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python bench/loss.py" in err[0]


def test_bad_option_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["distill", "--preset", "smoke", "--student", "x", "-o", str(tmp_path / "o"),
                     "--no-progress"])
    assert code == 2
    assert "--student needs --teacher" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdkernels.train.runtime import checkpoint

    monkeypatch.setenv("KDKERNELS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["distill", "--preset", "smoke", "-o", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    report = (out / "report.md").read_text()
    assert "KD benefit" in report and "student, CE only" in report
    assert "- torch threads: " in report  # the automatic choice and its reason
    assert re.search(r"train \d+ files, [\d,]+ tokens; held-out \d+ files", report)
    assert (out / "report.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"teacher", "kd", "ce"}
    ckpt = checkpoint.latest(out / "kd")
    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = torch.tensor([tok.encode("def f(x):\n    return x")])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    records = [json.loads(line) for line in (out / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "kd", "ce", "lr", "tokens_per_s", "peak_mem_mib"} <= set(records[0])
    # A second run into the same directory is refused without --overwrite.
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_threads_option_reaches_the_config():
    parser = cli.build_parser()
    args = parser.parse_args(["distill", "--preset", "smoke", "--threads", "1"])
    assert cli._config(args).threads == 1
    args = parser.parse_args(["distill", "--preset", "smoke"])
    assert cli._config(args).threads == 0  # automatic unless asked


def test_every_divergence_parameter_has_a_flag():
    parser = cli.build_parser()
    for div in divergences.TABLE:
        for name in div.params:
            args = parser.parse_args(["distill", f"--{name.replace('_', '-')}", "0.25"])
            assert getattr(args, name) == 0.25, (div.name, name)
    assert {"beta", "skew", "alpha"} <= set(cli.divergence_parameters())


def test_a_new_divergence_parameter_gets_a_flag(monkeypatch):
    fake = dataclasses.replace(divergences.get("alpha"), name="fake",
                               code=len(divergences.TABLE), params=("gamma_rate",))
    monkeypatch.setattr(divergences, "TABLE", (*divergences.TABLE, fake))
    args = cli.build_parser().parse_args(["distill", "--divergence", "fake",
                                          "--gamma-rate", "0.3"])
    assert args.divergence == "fake" and args.gamma_rate == 0.3
    assert cli.divergence_parameters()["gamma_rate"] == ["fake"]


def test_divergence_parameters_reach_the_config():
    args = cli.build_parser().parse_args(["distill", "--preset", "smoke", "--divergence",
                                          "skew_reverse_kl", "--skew", "0.3", "--alpha", "0.2"])
    cfg = cli._config(args)
    assert (cfg.divergence, cfg.skew, cfg.alpha, cfg.beta) == ("skew_reverse_kl", 0.3, 0.2, 0.5)
    assert cfg.loss_options()["skew"] == 0.3 and cfg.fingerprint()["skew"] == 0.3
