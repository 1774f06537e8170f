"""The top-k losses over 2 and 3 gloo ranks with uneven vocab shards: the same numbers as
one process (fp32 summation order differs: 1e-6 relative), bit-identical on every rank and
run, and a bad id on one rank raises on every rank."""

from __future__ import annotations

import pytest
import torch

import kdkernels
from kdkernels.reference import reference_kd_loss

from . import _topk_tp_worker as worker
from ._helpers import rel_err
from .test_vocab_parallel import world as vp_world


def world(parts: int, tmp_path_factory) -> list[dict]:
    return vp_world(parts, tmp_path_factory, "tests._topk_tp_worker")


def single(name: str) -> dict[str, torch.Tensor]:
    case = dict(worker.CASES[name])
    x = worker.make_inputs()
    kind = case.pop("kind", None)
    if kind == "logits":
        z = (x["h"] @ x["w"].T).detach().requires_grad_()
        loss = kdkernels.topk_kd_loss(z, x["ids"], x["lps"], x["labels"], **case)
        loss.backward(torch.linspace(0.5, 1.5, worker.N))
        return dict(loss=loss.detach(), grad_z=z.grad)
    h = x["h"].clone().requires_grad_()
    w = x["w"].clone().requires_grad_()
    loss, signals = worker.split(kdkernels.fused_linear_topk_kd_loss(
        h, w, x["ids"], x["lps"], x["labels"], **case))
    loss.backward(torch.ones_like(loss))
    return dict(loss=loss.detach(), grad_h=h.grad, grad_w=w.grad, **signals)


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("name", list(worker.CASES))
def test_matches_single_process(parts, name, tmp_path_factory):
    res = world(parts, tmp_path_factory)
    want = single(name)
    for rank, rr in enumerate(res):
        got = rr["cases"][name][0]
        lo, hi = rr["shard"]
        assert rel_err(got["loss"], want["loss"]) <= 1e-6
        if "grad_z" in got:
            assert rel_err(got["grad_z"], want["grad_z"][:, lo:hi]) <= 1e-5
        else:
            assert rel_err(got["grad_h"], want["grad_h"]) <= 1e-5, rank
            assert rel_err(got["grad_w"], want["grad_w"][lo:hi]) <= 1e-5, rank
        if "student_entropy" in want:  # full-vocabulary signals: against the oracle too
            case = worker.CASES[name]
            x = worker.make_inputs()
            # the signals do not depend on the teacher: the dense oracle gives them
            z = (x["h"] @ x["w"].T).double()
            ref = reference_kd_loss(z, z, x["labels"], temperature=case["temperature"],
                                    student_logit_scale=case["student_logit_scale"])
            for key in worker.SIGNALS:
                assert rel_err(got[key], ref[key]) <= 1e-5, (rank, key)
                assert torch.equal(got[key], want[key]) or rel_err(got[key], want[key]) <= 1e-6


@pytest.mark.parametrize("parts", [2, 3])
def test_bit_identical_on_every_rank_and_run(parts, tmp_path_factory):
    res = world(parts, tmp_path_factory)
    for name in worker.CASES:
        ref = res[0]["cases"][name][0]
        for rr in res:
            for run in rr["cases"][name]:
                assert torch.equal(run["loss"], ref["loss"]), name
                if "grad_h" in run:
                    assert torch.equal(run["grad_h"], ref["grad_h"]), name


@pytest.mark.parametrize("parts", [2, 3])
def test_bad_id_on_one_rank_raises_everywhere(parts, tmp_path_factory):
    res = world(parts, tmp_path_factory)
    for name, expect in worker.BAD.items():
        for rr in res:
            assert expect in rr["bad"][name], rr["bad"][name]
        assert "teacher_ids must be < V" in res[-1]["bad"][name]
