"""The kdk command line: help at every level, info, bench's missing-file message, and the
smoke preset end to end (report written, checkpoint loadable by transformers)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from kdkernels import cli


@pytest.mark.parametrize("argv", [["--help"], ["distill", "--help"]])
def test_help_at_every_level(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert ("distill" in text and "bench" in text) if argv == ["--help"] else "--kd-weight" in text


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "distill" in capsys.readouterr().out


def test_info_lists_backends(capsys):
    assert cli.main(["info", "--no-cuda-build"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out


def test_bench_without_the_source_tree_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_REPO", tmp_path)
    assert cli.main(["bench"]) == 2
    assert "bench_cpu.py not found" in capsys.readouterr().err


def test_bad_option_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["distill", "--preset", "smoke", "--student", "x", "-o", str(tmp_path / "o"),
                     "--no-progress"])
    assert code == 2
    assert "--student needs --teacher" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdkernels.train import checkpoint

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
    parser = cli.argparse.ArgumentParser()
    cli._distill_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["distill", "--preset", "smoke", "--threads", "1"])
    assert cli._config(args).threads == 1
    args = parser.parse_args(["distill", "--preset", "smoke"])
    assert cli._config(args).threads == 0  # automatic unless asked
