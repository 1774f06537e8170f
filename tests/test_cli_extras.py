"""`kdk distill` and `kdk cache-teacher` without the `[train]` extra: one line naming
`pip install 'kdkernels[train]'`, a non-zero exit and no traceback, before any trainer import."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdkernels import cli

EXTRA = "pip install 'kdkernels[train]'"
ROOT = Path(__file__).resolve().parent.parent


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] in names else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _no_trainer(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("the trainer ran although its extra is missing")

    monkeypatch.setattr(cli, "_distill", fail)
    monkeypatch.setattr(cli, "_cache_teacher", fail)


@pytest.mark.parametrize("package", ["transformers", "tokenizers", "matplotlib", "tqdm"])
def test_distill_without_a_train_package_names_the_extra(package, monkeypatch, capsys):
    _hide(monkeypatch, package)
    _no_trainer(monkeypatch)
    code = cli.main(["distill", "--preset", "smoke"])
    out, err = capsys.readouterr()
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert EXTRA in lines[0] and package in lines[0] and lines[0].startswith("kdk distill")
    assert "Traceback" not in err


def test_cache_teacher_without_transformers_names_the_extra(monkeypatch, capsys):
    _hide(monkeypatch, "transformers")
    _no_trainer(monkeypatch)
    code = cli.main(["cache-teacher", "--teacher", "default", "-o", "unused"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1
    assert EXTRA in err and "transformers" in err and err.startswith("kdk cache-teacher")


def test_cache_teacher_does_not_need_matplotlib(monkeypatch):
    _hide(monkeypatch, "matplotlib")
    assert cli._missing_train_extra("cache-teacher") is None
    assert "matplotlib" in cli._missing_train_extra("distill")


def test_help_and_other_commands_need_no_extra(monkeypatch, capsys):
    _hide(monkeypatch, "transformers", "tokenizers", "matplotlib", "tqdm")
    with pytest.raises(SystemExit) as exc:
        cli.main(["distill", "--help"])
    assert exc.value.code == 0
    assert cli.main([]) == 0
    assert cli._missing_train_extra("info") is None and cli._missing_train_extra("bench") is None


def test_with_the_extra_nothing_is_reported():
    assert cli._missing_train_extra("distill") is None  # the dev extra includes [train]


def test_the_installed_script_path_exits_cleanly():
    """A real process with transformers absent (sys.modules[name] = None makes find_spec
    return None): exit status 2, one line on stderr, no traceback."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from kdkernels import cli\n"
            "sys.exit(cli.main(['distill']))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("kdk distill: error: needs transformers"), proc.stderr
    assert EXTRA in lines[-1] and "Traceback" not in proc.stderr
    assert proc.stdout == ""
