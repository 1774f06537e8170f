"""Smoke tests of the CPU benchmarks (bench/loss.py, bench/harness.py, bench/common.py,
bench/topk.py, bench/before_after.py, bench/row_ops.py).

They exercise the plumbing at tiny shapes: worker processes, the out-of-memory, failure and
timeout paths, provider agreement, interleaved rounds, another checkout's kdkernels, the
table and the CSV. They time nothing and assert no timing: performance is measured by
running the benchmarks, not in tests.
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

from bench import before_after, common, harness, loss, row_ops, topk  # noqa: E402

TINY = "8,64,16,24"
LIMITS = harness.Limits(mem_mib=8 * 1024, min_available_mib=0, timeout_s=600)
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
    checks = loss.check_providers(eager, common.Shape(13, 257, 8, 12), "fp32", seed=1)
    assert set(checks) == set(eager)
    for name, c in checks.items():
        assert c.get("error") is None, (name, c)
        assert c["ok"] and c["loss"] < 1e-5 and c["grad_h"] < 1e-4 and c["grad_w"] < 1e-4, (
            name, c)


def test_floor_runs_the_gemms_into_the_gradients():
    inputs = common.make_inputs(common.Shape(10, 97, 8, 12), torch.float32, seed=2)
    plan = common.floor_plan(inputs)
    assert plan.chunk == 10 and plan.logits_dtype == torch.float32
    assert plan.dz_layout in ("in_place", "packed", "own")
    # A smaller workspace: the floor reads the driver's smaller chunks from its own calls.
    assert common.floor_plan(inputs, max_workspace_bytes=3 * 97 * 4 * 3).chunk < 10
    assert common.build_floor(inputs)(inputs) is None
    h, w = inputs.student_hidden, inputs.student_weight
    # With dZ = Zs (what the floor feeds its gradient GEMMs), the grads are exact products.
    zs = h.detach() @ w.detach().t()
    torch.testing.assert_close(h.grad, zs @ w.detach())
    torch.testing.assert_close(w.grad, zs.t() @ h.detach())


def test_loss_disagreement_is_reported():
    def res(name, value):
        return loss.Result(name, "fp32", "S1", loss=value)

    agree = [res("a", 1.0), res("b", 1.0 + 1e-6), res("c", 1.0 - 1e-6), res("floor", None)]
    assert loss.loss_disagreements(agree, "fp32") == {}
    off = [res("a", 1.0), res("b", 1.0 + 1e-6), res("c", 1.1), res("d", float("nan"))]
    assert set(loss.loss_disagreements(off, "fp32")) == {"c", "d"}
    assert loss.loss_disagreements(off[:1], "fp32") == {}
    # top-k: only the providers that compute the same loss are compared
    assert loss.loss_disagreements(off, "fp32", among=("a", "b")) == {}


def test_exit_classification():
    assert harness.classify_exit(-signal.SIGKILL)["status"] == "OOM"
    crash = harness.classify_exit(-signal.SIGSEGV)
    assert crash["status"] == "crash" and "SIGSEGV" in crash["error"]
    assert harness.classify_exit(1)["status"] == "crash"
    assert harness.classify_exit(-signal.SIGKILL, "timeout after 5 s, killed")["status"] == (
        "timeout")
    assert harness.classify_exit(-signal.SIGKILL, "OOM: RSS 9 MiB > limit")["status"] == "OOM"
    assert harness.is_oom(MemoryError())
    assert harness.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: ..."))
    assert harness.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not harness.is_oom(ValueError("shape mismatch"))


def test_rounds_alternate_their_order():
    assert harness.round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert harness.round_order(["a", "b", "c"], 1) == ["c", "b", "a"]


def test_merge_rounds_pools_the_calls_and_keeps_the_highest_peak():
    runs = [loss.Result("p", "fp32", "S1", status="ok", times_ms=[1.0, 2.0], peak_mib=10.0,
                        base_mib=4.0, loss=0.5),
            loss.Result("p", "fp32", "S1", status="OOM", error="killed"),
            loss.Result("p", "fp32", "S1", status="ok", times_ms=[3.0, 4.0, 5.0],
                        peak_mib=12.0, base_mib=5.0, loss=0.5)]
    merged = loss.merge_rounds(runs)
    assert merged.status == "ok" and merged.ms_median == 3.0 and merged.peak_mib == 12.0
    assert merged.peak_above_inputs_mib == 8.0 and "1 of 3 rounds failed" in merged.note
    assert loss.merge_rounds(runs[1:2]).status == "OOM"


def test_end_to_end_table_and_csv(tmp_path, capfd):
    out = tmp_path / "r.csv"
    rc = loss.main(["--shape", TINY, "--dtype", "fp32", "--providers", "kdkernels:torch",
                    "--no-check", "--seed", "5", "--csv", str(out)])
    assert rc == 0
    rows = _read_csv(out)
    assert [r["provider"] for r in rows] == ["floor", "kdkernels:torch"]
    for r in rows:
        assert r["status"] == "ok" and r["shape"] == TINY and r["dtype"] == "fp32", r
        assert len(r["times_ms"].split()) == 3
        assert float(r["peak_mib"]) >= float(r["base_mib"]) > 0
        assert float(r["peak_above_inputs_mib"]) >= 0 and r["machine"]
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
    rc = loss.main(["--shape", TINY, "--dtype", "bf16", "--providers", "naive",
                    "--no-check", "--mem-limit-mib", "64", "--csv", str(out)])
    assert rc == 0  # an OOM is a result, not a failure of the benchmark
    rows = _read_csv(out)
    assert [r["provider"] for r in rows] == ["floor", "naive"]
    for r in rows:
        assert r["status"] == "OOM" and "limit 64 MiB" in r["error"] and r["ms_median"] == "", r
    assert "| naive | bf16 |" in capfd.readouterr().out


def test_failed_and_timed_out_workers_are_reported():
    shape = common.parse_shape(TINY)
    bad = loss.run_provider("no-such-provider", shape, "fp32", LIMITS)
    assert bad.status == "error" and "unknown provider 'no-such-provider'" in bad.error
    assert bad.ms_median is None and bad.peak_mib and bad.peak_mib > 0
    slow = loss.run_provider("floor", shape, "fp32", harness.Limits(8 * 1024, 0, timeout_s=0.01))
    assert slow.status == "timeout" and slow.ms_median is None


def test_topk_loss_in_interleaved_rounds(tmp_path, capfd):
    out = tmp_path / "t.csv"
    rc = loss.main(["--loss", "topk", "--shape", "16,300,8,12", "--dtype", "fp32", "--k", "8",
                    "--providers", "topk_zero", "naive_topk", "--rounds", "2", "--repeats", "1",
                    "--csv", str(out)])
    assert rc == 0  # topk_zero and naive_topk compute the same loss: they agree
    rows = _read_csv(out)
    assert [r["provider"] for r in rows] == ["floor", "topk_zero", "naive_topk"]
    for r in rows:
        assert r["status"] == "ok" and r["k"] == "8" and len(r["times_ms"].split()) == 2, r
    assert rows[0]["note"].startswith("chunk 16 rows")
    assert abs(float(rows[1]["loss"]) - float(rows[2]["loss"])) < 1e-4
    assert "| topk_zero | fp32 |" in capfd.readouterr().out


def test_topk_teacher_ids_are_distinct_per_row():
    ids, lps = topk.make_teacher(5, 101, 16, seed=0)
    assert ids.shape == lps.shape == (5, 16)
    assert all(len(set(row.tolist())) == 16 for row in ids)
    torch.testing.assert_close(lps.exp().sum(-1), torch.full((5,), 0.9))


def test_a_worker_times_another_checkout(tmp_path):
    """--tree: the worker imports kdkernels from the named checkout (here a stub package
    that only has the public loss), and the floor refuses to run against it."""
    tree = tmp_path / "other"
    (tree / "kdkernels").mkdir(parents=True)
    (tree / "kdkernels" / "__init__.py").write_text(
        "import torch\n"
        "def fused_linear_kd_loss(h, w, g, u, labels=None, **kw):\n"
        "    return (h @ w.t()).float().pow(2).mean() + 42.0\n")
    shape = common.parse_shape(TINY)
    opts = loss.RunOptions(repeats=1, warmup=0, tree=tree)
    r = loss.run_provider("kdkernels:torch", shape, "fp32", LIMITS, opts)
    assert r.status == "ok", r.error
    assert Path(r.kdkernels) == tree.resolve() and r.loss > 42.0
    floor = loss.run_provider("floor", shape, "fp32", LIMITS, opts)
    assert floor.status == "error" and "this checkout only" in floor.error


def test_before_after_summary():
    runs = []
    for rnd, (b, a, f) in enumerate([(100.0, 90.0, 50.0), (120.0, 96.0, 60.0)]):
        for tree, prov, ms in (("before", "kdkernels:cpp", b), ("after", "kdkernels:cpp", a),
                               ("this checkout", before_after.FLOOR, f)):
            runs.append({"round": rnd, "tree": tree, "provider": prov, "dtype": "fp32",
                         "status": "ok", "ms_median": ms, "peak_mib": 700.0,
                         "times_ms": f"{ms + 1:.1f} {ms:.1f} {ms + 2:.1f}"})
    summary = before_after.summarize(runs, ["kdkernels:cpp"], ["fp32"], no_floor=False)
    floor, cpp = summary
    assert floor["after_ms"] == 55.0 and cpp["rounds"] == 2
    assert cpp["after_over_before"] == pytest.approx(93.0 / 110.0)
    assert cpp["round_ratio_min"] == pytest.approx(0.8) and cpp["round_ratio_max"] == 0.9
    assert cpp["after_over_floor"] == pytest.approx(93.0 / 55.0)
    assert (cpp["before_best_ms"], cpp["after_best_ms"], floor["after_best_ms"]) == (
        100.0, 90.0, 50.0)
    table = before_after.markdown(summary)
    assert "| kdkernels:cpp | fp32 | 110 | 93 | 0.845 |" in table and "| 100, 90 |" in table


def test_row_ops_cpu_runs_every_op(tmp_path):
    out = tmp_path / "r.csv"
    assert row_ops.main(["--impl", "torch", "--shapes", "8,300", "--rounds", "1",
                         "--dtypes", "float32", "--configs", "plain", "--csv", str(out)]) == 0
    ops = [r["op"] for r in _read_csv(out)]
    assert ops[:4] == ["copy", "exp fp32", "torch stats", "torch grad"]
    assert "torch student/dense (stats+grad)" in ops


def test_arguments_are_checked(capsys):
    for argv in (["--shape", "S9"], ["--providers", "magic"], ["--loss", "topk", "--providers",
                 "naive"], ["--rounds", "0"], ["--prompt-frac", "1.5"],
                 ["--device", "cuda"]):
        with pytest.raises(SystemExit) as info:
            loss.parse_args(argv)
        assert info.value.code == 2, argv
    assert loss.parse_args(["--providers", "kdkernels:cpp"]).providers == ["kdkernels:cpp"]
    assert [s.n for s in loss.parse_args(["--device", "cuda", "--out", "x"]).shapes] == [8192] * 4
