"""Smoke tests of the CPU benchmark harness (bench/bench_cpu.py, bench/common.py).

They exercise the plumbing at tiny shapes: worker processes, the out-of-memory, failure and
timeout paths, provider agreement, the table and the CSV. They time nothing and assert no
timing: performance is measured by running the benchmark, not in tests.
"""

from __future__ import annotations

import csv
import importlib.util
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_cpu, common  # noqa: E402

TINY = "8,64,16,24"
LIMITS = bench_cpu.Limits(mem_mib=8 * 1024, min_available_mib=0, timeout_s=600)
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAS_TRL = importlib.util.find_spec("trl") is not None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_parse_shape_names_and_errors():
    assert common.parse_shape("S1") == common.Shape(2048, 32000, 512, 1024)
    assert common.parse_shape("S2") == common.Shape(8192, 128256, 512, 1024)
    assert common.parse_shape("3,5,7,11") == common.Shape(3, 5, 7, 11)
    for bad in ("S3", "1,2,3", "1,2,3,0", "a,b,c,d"):
        with pytest.raises(ValueError, match=r"N,V,Ds,Dt"):
            common.parse_shape(bad)


def test_inputs_are_reproducible_and_logits_unit_scale():
    shape = common.Shape(64, 300, 32, 48)
    a = common.make_inputs(shape, torch.float32, seed=3)
    b = common.make_inputs(shape, torch.float32, seed=3)
    c = common.make_inputs(shape, torch.float32, seed=4)
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.student_hidden, c.student_hidden)
    assert a.student_hidden.requires_grad and a.student_weight.requires_grad
    assert not a.teacher_hidden.requires_grad and not a.teacher_weight.requires_grad
    assert a.labels.dtype == torch.int64 and 0 <= int(a.labels.min()) <= int(a.labels.max()) < 300
    for z in (a.student_hidden @ a.student_weight.t(), a.teacher_hidden @ a.teacher_weight.t()):
        assert 0.7 < float(z.detach().std()) < 1.4
    half = common.make_inputs(shape, torch.bfloat16, seed=3)
    assert all(t.dtype == torch.bfloat16 for t in half.tensors()[:4])


def test_eager_providers_agree_with_float64():
    names, skipped = common.discover_providers("cpu", torch.float32)
    assert names[0] == "floor" and "kdkernels:torch" in names and "naive" in names
    assert "kdkernels:triton" not in names  # the interpreter is no performance path
    assert ("liger" in names) == HAS_LIGER
    assert ("trl" in names) == HAS_TRL  # TRL's own chunked loss, checked like the others
    eager = [n for n in names if n != "floor" and not common.is_compiled(n)]
    checks = bench_cpu._check_providers(eager, common.Shape(13, 257, 8, 12), "fp32", seed=1)
    assert set(checks) == set(eager)
    for name, c in checks.items():
        assert c.get("error") is None, (name, c)
        assert c["ok"] and c["loss"] < 1e-5 and c["grad_h"] < 1e-4 and c["grad_w"] < 1e-4, (
            name, c)


def test_floor_runs_the_gemms_into_the_gradients():
    inputs = common.make_inputs(common.Shape(10, 97, 8, 12), torch.float32, seed=2)
    plan = common.floor_plan(inputs)
    assert 1 <= plan.chunk <= 10 and plan.logits_dtype == torch.float32
    assert common.build_floor(inputs)(inputs) is None
    h, w = inputs.student_hidden, inputs.student_weight
    # With dZ = Zs (what the floor feeds its gradient GEMMs), the grads are exact products.
    zs = h.detach() @ w.detach().t()
    torch.testing.assert_close(h.grad, zs @ w.detach())
    torch.testing.assert_close(w.grad, zs.t() @ h.detach())


def test_loss_disagreement_is_reported():
    def res(name, loss):
        return bench_cpu.Result(name, "fp32", "S1", loss=loss)

    agree = [res("a", 1.0), res("b", 1.0 + 1e-6), res("c", 1.0 - 1e-6), res("floor", None)]
    assert bench_cpu.loss_disagreements(agree, "fp32") == {}
    off = [res("a", 1.0), res("b", 1.0 + 1e-6), res("c", 1.1), res("d", float("nan"))]
    assert set(bench_cpu.loss_disagreements(off, "fp32")) == {"c", "d"}
    assert bench_cpu.loss_disagreements(off[:1], "fp32") == {}


def test_exit_classification():
    assert bench_cpu.classify_exit(-signal.SIGKILL)["status"] == "OOM"
    crash = bench_cpu.classify_exit(-signal.SIGSEGV)
    assert crash["status"] == "crash" and "SIGSEGV" in crash["error"]
    assert bench_cpu.classify_exit(1)["status"] == "crash"
    assert bench_cpu.classify_exit(-signal.SIGKILL, "timeout after 5 s, killed")["status"] == (
        "timeout")
    assert bench_cpu.classify_exit(-signal.SIGKILL, "OOM: RSS 9 MiB > limit")["status"] == "OOM"
    assert bench_cpu._is_oom(MemoryError())
    assert bench_cpu._is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: ..."))
    assert not bench_cpu._is_oom(ValueError("shape mismatch"))


def test_end_to_end_table_and_csv(tmp_path, capfd):
    out = tmp_path / "r.csv"
    rc = bench_cpu.main(["--shape", TINY, "--dtype", "fp32", "--providers", "kdkernels:torch",
                         "--no-check", "--seed", "5", "--csv", str(out)])
    assert rc == 0
    rows = _read_csv(out)
    assert [r["provider"] for r in rows] == ["floor", "kdkernels:torch"]
    for r in rows:
        assert r["status"] == "ok" and r["shape"] == TINY and r["dtype"] == "fp32", r
        assert len(r["times_ms"].split()) == 3
        assert float(r["peak_mib"]) >= float(r["base_mib"]) > 0
    assert float(rows[0]["ratio_floor"]) == 1.0 and rows[0]["loss"] == ""
    assert rows[0]["note"].startswith("chunk ")
    # The worker drew the same inputs from the same seed as this process does.
    inputs = common.make_inputs(common.parse_shape(TINY), torch.float32, seed=5)
    naive = float(common.naive_loss(*inputs.tensors()).detach())
    assert abs(float(rows[1]["loss"]) - naive) <= 1e-5 * naive
    table = capfd.readouterr().out.strip().splitlines()
    assert table[-2].startswith("| floor | fp32 |")
    assert table[-1].startswith("| kdkernels:torch | fp32 |")


def test_memory_watchdog_reports_oom_and_continues(tmp_path, capfd):
    out = tmp_path / "r.csv"
    # A 64 MiB cap is below what importing torch takes: every worker is killed by the parent.
    rc = bench_cpu.main(["--shape", TINY, "--dtype", "bf16", "--providers", "naive",
                         "--no-check", "--mem-limit-mib", "64", "--csv", str(out)])
    assert rc == 0  # an OOM is a result, not a failure of the benchmark
    rows = _read_csv(out)
    assert [r["provider"] for r in rows] == ["floor", "naive"]
    for r in rows:
        assert r["status"] == "OOM" and "limit 64 MiB" in r["error"] and r["ms_median"] == "", r
    assert "| naive | bf16 |" in capfd.readouterr().out


def test_failed_and_timed_out_workers_are_reported():
    shape = common.parse_shape(TINY)
    bad = bench_cpu.run_provider("no-such-provider", shape, "fp32", LIMITS)
    assert bad.status == "error" and "unknown provider 'no-such-provider'" in bad.error
    assert bad.ms_median is None and bad.peak_mib and bad.peak_mib > 0
    slow = bench_cpu.run_provider("floor", shape, "fp32",
                                  bench_cpu.Limits(8 * 1024, 0, timeout_s=0.01))
    assert slow.status == "timeout" and slow.ms_median is None
