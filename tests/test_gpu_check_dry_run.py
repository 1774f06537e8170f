"""bench/gpu_check.sh --dry-run (CI, CPU): arguments, provider discovery, CSVs, the table;
bench/loss.py --device cuda's argument checks."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=180)


def test_dry_run_writes_csvs_and_prints_the_table_last(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench import loss_cuda, topk

    out = tmp_path / "out"
    proc = _run(str(out), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with (out / "gpu_bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    seen = {(r["shape"], r["provider"]) for r in rows}
    for shape in loss_cuda.GPU_SHAPES:
        for provider in ("floor", "kdk-triton", "kdk-torch", "naive", "liger-chunked",
                         "liger-jsd", "trl"):
            assert (shape, provider) in seen
    assert {r["status"] for r in rows} == {"dry-run"}
    assert all(r["note"] for r in rows)  # each says why it would be skipped, or "would run"
    assert (out / "gpu_rowops.csv").read_text().startswith("what,divergence,rows,vocab")
    with (out / "gpu_topk.csv").open() as f:
        topk_rows = list(csv.DictReader(f))
    assert list(topk_rows[0]) == ["shape", "dtype", "k", "provider", "status", "ms_median",
                                  "ratio_to_floor", "peak_above_inputs_mib"]
    assert {(r["shape"], r["provider"]) for r in topk_rows} == {
        (s, p) for s in ("S1", "S2") for p in topk.PROVIDERS if p != "dense_fused"}
    assert {r["status"] for r in topk_rows} == {"dry-run"}
    table = (out / "summary.txt").read_text().strip().splitlines()
    assert table[1].split()[:3] == ["shape", "provider", "ms"]
    lines = proc.stdout.strip().splitlines()
    assert "dry run done (status 0)" in lines[-1]
    assert lines[-2] == table[-1]  # the table is the last thing the bench prints


@pytest.mark.parametrize("args", [(), ("a", "b", "c"), ("out", "--fast")])
def test_bad_arguments_are_rejected(args, tmp_path):
    proc = _run(*[str(tmp_path / a) if a == "out" else a for a in args])
    assert proc.returncode == 2 and "usage: bash bench/gpu_check.sh OUTDIR" in proc.stderr


def test_loss_cuda_rejects_unknown_names(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    from bench import loss

    for argv in (["--shape", "liger", "v999k"], ["--providers", "floor", "magic"],
                 ["--providers", "kdkernels:triton"], ["--budget-s", "0"]):
        with pytest.raises(SystemExit) as info:
            loss.parse_args(["--device", "cuda", "--out", str(tmp_path), *argv])
        assert info.value.code == 2
    assert "unknown provider 'magic'" in capsys.readouterr().err
