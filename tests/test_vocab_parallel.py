"""Vocab-parallel distillation: gloo worlds of 2, 3 and 4 ranks on this machine.

One world per size runs every case (tests/_tp_worker.py) twice and every bad input once,
so process start-up is paid three times in all. The test side rebuilds the full tensors from
the same seed and compares with the float64 oracle.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdkernels
from kdkernels.parallel import VocabParallel
from kdkernels.parallel.shard_layout import check_tiling as _check_tiling
from kdkernels.reference import reduce_rows, reference_fused_linear_kd_loss, reference_kd_loss

from ._helpers import rel_err
from .conftest import cpu_impls

# Production CPU backends found here (the Triton interpreter is too slow for spawned worlds);
# finding them in this process also builds the C++ extension once, before ranks load it.
IMPLS = [name for name in cpu_impls() if name in ("torch", "cpp")]
os.environ["KDK_TP_IMPLS"] = ",".join(IMPLS)
from . import _tp_worker as W  # noqa: E402  (reads KDK_TP_IMPLS)

pytestmark = pytest.mark.distributed

WORLDS = (2, 3, 4)
# fp32 vs the float64 oracle, norm-wise: the row sums run over <= 1009 logits of magnitude
# ~5 in fp32 (eps 6e-8), so accumulated rounding stays near 1e-6; 1e-5 is the bound.
TOL = 1e-5
# bf16 cases: the oracle sees the same bf16 values in float64. The loss is fp32 math (or
# bf16 GEMMs on CPUs with native ones: 2**-8); gradients are rounded to bf16 (2**-9 per
# element) after bf16 GEMMs: 2**-7 norm-wise.
BF16_TOL = {"loss": 2.0**-8, "grad": 2.0**-7}
WORLD_TIMEOUT_S = 240  # a hang (a collective one rank never joins) fails; loaded CI needs ~90 s
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULTS: dict[tuple[str, int], list[dict]] = {}


def world(parts: int, tmp_path_factory, worker: str = "tests._tp_worker") -> list[dict]:
    """Run (once per session) a gloo world of `parts` ranks of the module ``worker``
    (``python -m worker RANK WORLD PORT OUT``); its per-rank results."""
    if (worker, parts) in _RESULTS:
        return _RESULTS[worker, parts]
    out = tmp_path_factory.mktemp(f"{worker.rsplit('.', 1)[-1]}{parts}")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", worker, str(r), str(parts),
                               str(port), str(out / f"rank{r}.pt")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(parts)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=WORLD_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {parts}-rank world did not finish in {WORLD_TIMEOUT_S} s (a hang)")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r][-3000:]}"
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(parts)]
    for r, rr in enumerate(res):
        assert "crash" not in rr, f"rank {r} crashed:\n{rr['crash']}"
    _RESULTS[worker, parts] = res
    return res


def _bounds(name: str, parts: int, rank: int) -> tuple[int, int]:
    case = W.CASES[name]
    if case.get("kind") == "single":
        return 0, W.V
    if case.get("kind") == "dtensor":
        return W.dtensor_shard(W.V, parts, rank)
    return W.shard(W.V, parts, rank, case.get("layout", "rank"))


def _oracle(name: str, parts: int) -> dict[str, torch.Tensor | None]:
    """Loss and full gradients in float64."""
    case = W.CASES[name]
    x = W.make_inputs(case, parts)
    opts = W.options(case)
    d = {k: None if v is None else v.double() for k, v in x.items() if k != "labels"}
    h, w = d["h"].requires_grad_(), d["w"].requires_grad_()
    bs = None if d["bs"] is None else d["bs"].requires_grad_()
    if case.get("kind") == "logits":
        zs = (x["h"] @ x["w"].t()).double().requires_grad_()
        zt = (x["g"] @ x["u"].t()).double()
        res = reference_kd_loss(zs, zt, x["labels"], **opts)
        res["loss"].backward()
        return {"loss": res["loss"], "grad_zs": zs.grad, **_signals(res, opts)}
    res = reference_fused_linear_kd_loss(h, w, d["g"], d["u"], x["labels"], student_bias=bs,
                                         teacher_bias=d["bt"], **opts)
    loss = res["loss"]
    (loss * d["go"]).sum().backward() if d["go"] is not None else loss.backward()
    out = {"loss": loss.detach(), "grad_h": h.grad, "grad_w": w.grad,
           "grad_bs": None if bs is None else bs.grad}
    return {**out, **_signals(res, opts)}


def _signals(res: dict, opts: dict) -> dict:
    """The oracle's components (W.SIGNALS), reduced as the loss is, for return_components."""
    if not opts.get("return_components"):
        return {}
    rows = dict(kd=res["kd_rows"], ce=res["ce_rows"], student_entropy=res["student_entropy"],
                label_logprob=res["label_logprob"])
    return {k: reduce_rows(rows[k], res["kept"], opts.get("reduction", "mean"),
                           opts.get("num_items")) for k in W.SIGNALS}


@pytest.mark.parametrize("name", list(W.CASES))
@pytest.mark.parametrize("parts", WORLDS)
def test_matches_oracle(parts, name, tmp_path_factory):
    res = world(parts, tmp_path_factory)
    ref = _oracle(name, parts)
    ranks = [rr["cases"][name][0] for rr in res]
    half = W.CASES[name].get("dtype") == "bf16"
    loss_tol, tol = (BF16_TOL["loss"], BF16_TOL["grad"]) if half else (TOL, TOL)
    for r, got in enumerate(ranks):
        assert rel_err(got["loss"], ref["loss"]) <= loss_tol, (r, got["loss"], ref["loss"])
        for key in W.SIGNALS:
            if key in ref:
                assert rel_err(got[key], ref[key]) <= TOL, (r, key)
    if "grad_zs" in ref:  # kd_loss: each rank's logit gradient is its column slice
        full = torch.cat([rr["grad_zs"] for rr in ranks], 1)
        cols = torch.cat([torch.arange(*_bounds(name, parts, r)) for r in range(parts)])
        assert rel_err(full, ref["grad_zs"][:, cols]) <= TOL
        return
    single = W.CASES[name].get("kind") == "single"
    for key, ref_key in (("grad_w", "grad_w"), ("grad_bs", "grad_bs")):
        if ref[ref_key] is None:
            assert all(rr[key] is None for rr in ranks)
            continue
        for r, rr in enumerate(ranks):
            lo, hi = _bounds(name, parts, r)
            assert rr[key].shape[0] == hi - lo
            assert rr[key].dtype == (torch.bfloat16 if half else torch.float32)
            assert rel_err(rr[key], ref[ref_key][lo:hi]) <= tol, (r, key)
        if not single:  # the slices together are the whole gradient
            assert sum(rr[key].shape[0] for rr in ranks) == W.V
    for r, rr in enumerate(ranks):
        assert rr["grad_h"].dtype == (torch.bfloat16 if half else torch.float32)
        assert rel_err(rr["grad_h"], ref["grad_h"]) <= tol, r


@pytest.mark.parametrize("parts", WORLDS)
def test_identical_on_every_rank_and_run(parts, tmp_path_factory):
    res = world(parts, tmp_path_factory)
    for name in W.CASES:
        runs = [rr["cases"][name] for rr in res]
        for r in range(parts):
            first, second = runs[r]
            for key, val in first.items():
                if isinstance(val, torch.Tensor):
                    assert torch.equal(val, second[key]), (name, r, key, "not deterministic")
        if W.CASES[name].get("kind") == "single":
            continue
        for key in ("loss", "grad_h", "kd", "ce"):
            vals = [runs[r][0].get(key) for r in range(parts)]
            if vals[0] is not None:
                assert all(torch.equal(v, vals[0]) for v in vals), (name, key, "ranks differ")


@pytest.mark.parametrize("parts", WORLDS)
def test_chunks_match_a_single_process_of_the_widest_shard(parts, tmp_path_factory, monkeypatch):
    """Every rank plans its chunks with the single-process planner for the widest shard:
    balanced, charging dL/dz only where it has a buffer of its own."""
    res = world(parts, tmp_path_factory)
    name = "softcap_sum_small_workspace"  # sized by its workspace budget, not chunk_size
    widest = max(W.widths(W.V, parts))
    case = dict(W.CASES[name])
    x = W.make_inputs(case, parts)
    labels = x["labels"].clamp(max=widest - 1)
    labels[list(W.IGNORED_ROWS)] = W.IGNORE
    single: list = []
    from kdkernels.engine import driver

    monkeypatch.setattr(driver, "plan_chunks", driver.plan_chunks)
    W.record_plans(single)  # undone by monkeypatch
    h = x["h"].clone().requires_grad_()
    w = x["w"][:widest].clone().requires_grad_()
    kdkernels.fused_linear_kd_loss(h, w, x["g"], x["u"][:widest], labels,
                                   **W.options(case)).backward()
    assert len(single) == 1
    for r, rr in enumerate(res):
        plans = rr["plans"][name]
        assert plans and all(p == single[0] for p in plans), (r, plans, single)


@pytest.mark.parametrize("bad", list(W.BAD))
@pytest.mark.parametrize("parts", WORLDS)
def test_bad_input_raises_on_every_rank(parts, bad, tmp_path_factory):
    res = world(parts, tmp_path_factory)
    for r, rr in enumerate(res):
        msg = rr["bad"][bad]
        assert W.BAD[bad] in msg, f"rank {r}: expected {W.BAD[bad]!r}, got {msg!r}"
        if r == parts - 1 and bad in W.BAD_ON_LAST_RANK:
            assert W.BAD_ON_LAST_RANK[bad] in msg, msg


def test_tiling_messages():
    _check_tiling([0, 5, 9], [5, 4, 3])
    with pytest.raises(ValueError, match="rank 1's shard starting at 4 overlaps row 5"):
        _check_tiling([0, 4], [5, 4])
    with pytest.raises(ValueError, match="rank 0's shard starting at 6 leaves a gap before"):
        _check_tiling([6, 0], [4, 5])


def test_vocab_parallel_arguments():
    with pytest.raises(ValueError, match="vocab_start must be a non-negative int"):
        VocabParallel(vocab_start=-1)
    with pytest.raises(ValueError, match="vocab_start must be a non-negative int"):
        VocabParallel(vocab_start=2.0)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        VocabParallel(group="world")


def test_needs_an_initialised_process_group():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialised"):
        kdkernels.fused_linear_kd_loss(h, w, h, w, vocab_parallel=VocabParallel())
