"""fused_linear_uld_loss (kdkernels/uld/fused.py) against the loss on materialised logits
(``uld_loss`` with ``logits = hidden @ W.T + b``, computed in float64) and the float64 oracle.

Tolerances: relative errors are norm-wise, ||ours - ref|| / ||ref||, on the loss and on the
gradients w.r.t. student hidden, weight and bias (plus ZERO_NORM: a reference gradient that is
zero up to rounding has no direction to be relative to).

* float64 inputs: 1e-10. The same math in float64; only the order of sums (chunking, the
  GEMMs' blocking, exp(sum log) for the merge product) differs.
* float32: 1e-5, the issue's bound. The fused loss runs the GEMMs and the row math in fp32
  (softmax over <= 600 columns, sums of <= 600 sorted differences per row, D <= 24): the
  errors we see are <= 5e-6 (the hybrid's JSD at beta = 1, whose log-ratio gradient
  amplifies fp32 logits error most) and mostly < 1e-6; a wrong term (a missing group, a
  scalar's CE-like gradient, a normaliser) errs by >= 1e-3. The sorted L1's gradient is a
  sign per rank, discontinuous where a student and a teacher value tie at a rank; random
  continuous logits make such a near-tie (within fp32's 1e-7) improbable at these sizes.
* bfloat16: 2e-2 against float64 on the same bf16 values. On CPUs without native bf16
  GEMMs the GEMMs run in fp32 and only the final rounding of each gradient to bf16 (2**-9
  relative per element) remains (we see ~2e-3); with native bf16 GEMMs the logits themselves
  are rounded to bf16 (2**-9 relative, ~1e-2 absolute at |z| ~ 3), which moves the
  probabilities by ~1% and can flip a rank's sign, the error the project's dense bf16 tests
  also allow (tests/test_memory.py: 2e-2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdkernels.uld import align_batch, rows
from kdkernels.uld.fused import cpp_unavailable, fused_linear_uld_loss
from kdkernels.uld.logits import merged_rows, uld_loss
from kdkernels.uld.reference import uld_loss_reference

from ._uld_helpers import synthetic_batch

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("student_labels", "teacher_labels", "student_input_ids", "teacher_input_ids")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}
# The norm below which a result counts as zero: the rounding noise of a sum of O(1) terms that
# cancels exactly (the sorted L1's gradient does at some ties of tiny vocabularies), a few
# hundred eps of the dtype; far below any wrong term (>= 1e-3 relative of gradients ~1e-2..1).
ZERO_NORM = {torch.float64: 1e-13, torch.float32: 1e-7, torch.bfloat16: 1e-5}
IMPLS = ["torch"] + ([] if cpp_unavailable(torch.device("cpu"), torch.float32) else ["cpp"])


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every workspace buffer starts as NaN: a value read before it is written shows."""
    monkeypatch.setattr(rows, "POISON", True)


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are tiny: on a loaded machine OpenMP's barriers between threads cost more
    than the ops (20 ms per small GEMM at load 6 on 2 cores). The C++ kernel's threading is
    exercised by test_cpp_threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(seed: int, B: int, vs: int, vt: int) -> dict:
    return synthetic_batch(seed, B, vs, vt, max_bytes=12, prompt_max=3)


def _model(batch: dict, vs: int, vt: int, ds: int, dt: int, seed: int, dtype=torch.float64,
           bias: bool = True) -> dict:
    """Student and teacher hidden states and heads whose logits have std ~ 2."""
    g = torch.Generator().manual_seed(seed)
    B, Ls = batch["student_input_ids"].shape
    Lt = batch["teacher_input_ids"].shape[1]

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    return {"h": rnd(B, Ls, ds), "w": rnd(vs, ds, std=2 / ds**0.5),
            "b": rnd(vs, std=0.5) if bias else None,
            "g": rnd(B, Lt, dt), "u": rnd(vt, dt, std=2 / dt**0.5),
            "bt": rnd(vt, std=0.5) if bias else None}


def _vocab_map(vs: int, vt: int, seed: int, share: float = 0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(min(vs, vt) * share)
    vmap = torch.full((vt,), -1, dtype=torch.long)
    vmap[torch.randperm(vt, generator=g)[:n]] = torch.randperm(vs, generator=g)[:n]
    return vmap


def _args(batch: dict, offsets: bool) -> tuple:
    out = tuple(batch[k] for k in KEYS)
    if offsets:
        out += (batch["student_offsets"], batch["teacher_offsets"])
    return out


def _fused(m: dict, batch: dict, offsets: bool, go=None, **kw):
    """(loss, grads of h, w, b) of the fused loss on the model ``m`` (its dtype)."""
    h, w = m["h"].clone().requires_grad_(), m["w"].clone().requires_grad_()
    b = None if m["b"] is None else m["b"].clone().requires_grad_()
    loss = fused_linear_uld_loss(h, w, m["g"], m["u"], *_args(batch, offsets), student_bias=b,
                                 teacher_bias=m["bt"], **kw)
    (loss.sum() if go is None else (loss * go.to(loss.dtype)).sum()).backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def _materialised(m: dict, batch: dict, offsets: bool, go=None, loss_fn=uld_loss, **kw):
    """The same in float64 on materialised logits (of the model's values)."""
    h, w = (m[k].detach().double().requires_grad_() for k in ("h", "w"))
    b = None if m["b"] is None else m["b"].detach().double().requires_grad_()
    zs = h @ w.T + (0 if b is None else b)
    zt = m["g"].double() @ m["u"].double().T + (0 if m["bt"] is None else m["bt"].double())
    loss = loss_fn(zs, zt, *_args(batch, offsets), **kw)
    (loss.sum() if go is None else (loss * go.double()).sum()).backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    scale = b.norm().item()
    return (a - b).norm().item() / scale if scale > 0 else (a - b).norm().item()


def _check(ours, ref, tol: float) -> list[float]:
    """Norm-wise relative errors <= tol, where a reference that is zero up to rounding (an
    exactly cancelling gradient comes out ~1e-16 in float64) counts as zero: the error of
    each tensor may also be up to ZERO_NORM of our dtype in absolute terms."""
    errs = [_rel(x, y) for x, y in zip(ours, ref, strict=True) if y is not None]
    for x in ours:
        if x is not None:
            assert torch.isfinite(x.float()).all()
    for x, y in zip(ours, ref, strict=True):
        if y is not None:
            diff = (x.double() - y.double()).norm().item()
            assert diff <= tol * y.double().norm().item() + ZERO_NORM[x.dtype], errs
    return errs


VS, VT, DS, DT = 97, 131, 12, 20
CASES = {
    "plain": {},
    "plain_bayes_T": {"merge": "bayesian", "student_temperature": 1.7,
                      "teacher_temperature": 0.6},
    "hybrid": {"hybrid": True},
    "hybrid_fixed_bayes": {"hybrid": True, "merge": "bayesian", "matched_weight": 0.7,
                           "unmatched_weight": 0.2, "beta": 0.3},
    "hybrid_beta0_T": {"hybrid": True, "beta": 0.0, "student_temperature": 0.8},
    "hybrid_beta1": {"hybrid": True, "beta": 1.0, "teacher_temperature": 1.4},
    "ce": {"ce_weight": 0.4, "distillation_weight": 0.7},
    "ce_T_sum": {"ce_weight": 0.3, "student_temperature": 1.6, "reduction": "sum"},
    "hybrid_ce_T_bayes": {"hybrid": True, "ce_weight": 0.2, "merge": "bayesian",
                          "student_temperature": 0.7, "teacher_temperature": 2.0},
    "eos_kept": {"skip_student_eos": False, "skip_teacher_eos": False, "ce_weight": 0.1},
}


def _kw(case: dict, vmap) -> dict:
    kw = {k: v for k, v in case.items() if k != "hybrid"}
    if case.get("hybrid"):
        kw["vocab_map"] = vmap
    return kw


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offsets", [True, False], ids=["bytes", "positional"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_materialised_loss(case, offsets, impl):
    batch = _batch(3, 4, VS, VT)
    vmap = _vocab_map(VS, VT, 1)
    kw = _kw(CASES[case], vmap)
    ref = None
    for dtype, chunk in ((torch.float64, 1), (torch.float32, 7), (torch.float32, 10_000)):
        if impl == "cpp" and dtype == torch.float64:
            continue
        m = _model(batch, VS, VT, DS, DT, seed=5, dtype=dtype)
        ref = _materialised(m, batch, offsets, **kw)
        assert ref[0] > 0
        ours = _fused(m, batch, offsets, impl=impl, chunk_size=chunk, **kw)
        _check(ours, ref, TOL[dtype])


def test_float64_oracle_and_reduction_none():
    """The float64 oracle (kdkernels/uld/reference.py) agrees, per sample, and a non-uniform
    grad_output through reduction='none' (the passes re-run with it as sample weights)."""
    batch = _batch(11, 5, VS, VT)
    vmap = _vocab_map(VS, VT, 2)
    go = torch.tensor([0.5, -1.25, 2.0, 0.0, 1.0])
    for case in ("plain_bayes_T", "hybrid_ce_T_bayes"):
        kw = {**_kw(CASES[case], vmap), "reduction": "none"}
        m = _model(batch, VS, VT, DS, DT, seed=6)
        oracle = _materialised(m, batch, True, go=go, loss_fn=uld_loss_reference, **kw)
        ours = _fused(m, batch, True, go=go, chunk_size=3, **kw)
        assert ours[0].shape == (5,)
        _check(ours, oracle, TOL[torch.float64])
        m32 = _model(batch, VS, VT, DS, DT, seed=6, dtype=torch.float32)
        _check(_fused(m32, batch, True, go=go, **kw),
               _materialised(m32, batch, True, go=go, loss_fn=uld_loss_reference, **kw),
               TOL[torch.float32])


@pytest.fixture(params=["native_half_gemm", "fp32_gemm"])
def cpu_kind(request, monkeypatch):
    """Both kinds of CPU: bf16 GEMMs natively (logits in bf16) or in fp32."""
    from kdkernels.engine import gemm

    monkeypatch.setenv("KDKERNELS_CPU_HALF_GEMM", "1" if request.param == "native_half_gemm"
                       else "0")
    gemm.cpu_has_fast_half_gemm.cache_clear()
    yield request.param
    gemm.cpu_has_fast_half_gemm.cache_clear()


def _materialised_bf16_logits(m: dict, batch: dict, offsets: bool, **kw):
    """The float64 loss of the bf16 logits a bf16 GEMM gives (torch.addmm in bf16: one
    rounding of each logit), with the gradients chained back in float64."""
    h, g = m["h"], m["g"]
    zs = torch.addmm(m["b"], h.reshape(-1, h.shape[-1]), m["w"].T).double().requires_grad_()
    zt = torch.addmm(m["bt"], g.reshape(-1, g.shape[-1]), m["u"].T).double()
    loss = uld_loss(zs.view(*h.shape[:2], -1), zt.view(*g.shape[:2], -1),
                    *_args(batch, offsets), **kw)
    loss.sum().backward()
    gz = zs.grad
    return (loss.detach(), (gz @ m["w"].double()).view(h.shape),
            gz.T @ h.double().reshape(-1, h.shape[-1]), gz.sum(0))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16(case, impl, cpu_kind, monkeypatch):
    """Against float64 on the same bf16 values. Where the CPU multiplies bf16 natively the
    logits themselves are bf16 (the GEMM's one rounding, 2**-9 relative): the sorted L1's
    sign gradient then flips at the ranks where rounding reorders student vs teacher values,
    which moves the gradients by up to ~15% for *any* bf16 implementation (the materialised
    loss on bf16 logits errs as much), so the reference there is the float64 loss of those
    rounded logits. What remains is the bf16 rounding of dL/dz before the gradient GEMMs and
    of the gradients (we see <= 4e-3). bf16 logits also tie exactly (their values repeat),
    and a tied value's rank, so its sign, is a choice among valid subgradients: our sorts rank
    ties by column index (stable), so the reference sorts stably too. With fp32 GEMMs the
    heads are cast a block of rows at a time (here 7 rows)."""
    from kdkernels.uld import fused

    monkeypatch.setattr(fused, "_CAST_BLOCK_BYTES", 7 * DT * 4)
    sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort",
                        lambda self, *a, **k: sort(self, *a, **{**k, "stable": True}))
    batch = _batch(4, 3, VS, VT)
    kw = _kw(CASES[case], _vocab_map(VS, VT, 3))
    m = _model(batch, VS, VT, DS, DT, seed=7, dtype=torch.bfloat16)
    ours = _fused(m, batch, True, chunk_size=5, impl=impl, **kw)
    assert ours[0].dtype == torch.float32
    assert all(x.dtype == torch.bfloat16 for x in ours[1:])
    ref = (_materialised_bf16_logits(m, batch, True, **kw) if cpu_kind == "native_half_gemm"
           else _materialised(m, batch, True, **kw))
    _check(ours, ref, TOL[torch.bfloat16])


def test_chunk_sizes_and_budgets_agree():
    """Chunks of 1, a prime, more than the groups, and budget-derived chunks: one answer."""
    batch = _batch(8, 4, VS, VT)
    vmap = _vocab_map(VS, VT, 4)
    m = _model(batch, VS, VT, DS, DT, seed=8)
    kw = {"vocab_map": vmap, "ce_weight": 0.2, "merge": "bayesian"}
    runs = [_fused(m, batch, True, chunk_size=c, **kw) for c in (1, 5, 10**6)]
    runs += [_fused(m, batch, True, max_workspace_bytes=b, **kw) for b in (1, 50_000, 2**30)]
    for r in runs[1:]:
        _check(r, runs[0], 1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_teacher_gradient(impl):
    batch = _batch(2, 3, VS, VT)
    m = _model(batch, VS, VT, DS, DT, seed=9, dtype=torch.float32)
    g, u, bt = (m[k].clone().requires_grad_() for k in ("g", "u", "bt"))
    h = m["h"].clone().requires_grad_()
    loss = fused_linear_uld_loss(h, m["w"], g, u, *_args(batch, True), teacher_bias=bt,
                                 ce_weight=0.1, impl=impl)
    loss.backward()
    assert g.grad is None and u.grad is None and bt.grad is None
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_degenerate_batches_give_zero_not_nan():
    batch = _batch(1, 3, VS, VT)
    for k in ("student_labels", "teacher_labels"):
        batch[k] = torch.full_like(batch[k], -100)
    m = _model(batch, VS, VT, DS, DT, seed=1)
    for kw in ({}, {"ce_weight": 0.5}, {"reduction": "none"}, {"vocab_map": _vocab_map(VS, VT, 0)}):
        loss, gh, gw, gb = _fused(m, batch, True, **kw)
        assert (loss == 0).all() and not gh.any() and not gw.any() and not gb.any()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), B=st.integers(1, 4),
       vs=st.sampled_from([2, 3, 5, 31, 53]), vt=st.sampled_from([2, 7, 29, 61]),
       ds=st.sampled_from([1, 3, 7]), dt=st.sampled_from([2, 5]),
       merge=st.sampled_from(["observed", "bayesian"]), offsets=st.booleans(),
       hybrid=st.booleans(), ce=st.sampled_from([0.0, 0.3]),
       temps=st.sampled_from([(1.0, 1.0), (0.7, 1.9)]), chunk=st.sampled_from([1, 2, 3, 97]),
       reduction=st.sampled_from(["mean", "sum"]), top_k=st.sampled_from([None, 64]))
def test_property_shapes(seed, B, vs, vt, ds, dt, merge, offsets, hybrid, ce, temps, chunk,
                         reduction, top_k):
    """Odd and prime shapes, tiny vocabularies (top-k 64 covers them: the full loss), any
    alignment; float64 against the materialised loss."""
    batch = _batch(seed, B, vs, vt)
    m = _model(batch, vs, vt, ds, dt, seed, bias=seed % 2 == 0)
    kw = {"merge": merge, "ce_weight": ce, "student_temperature": temps[0],
          "teacher_temperature": temps[1], "reduction": reduction}
    if hybrid:
        kw["vocab_map"] = _vocab_map(vs, vt, seed, share=0.5)
    ref = _materialised(m, batch, offsets, **kw)
    _check(_fused(m, batch, offsets, chunk_size=chunk, uld_top_k=top_k, **kw), ref,
           TOL[torch.float64])


@pytest.mark.skipif("cpp" not in IMPLS, reason="the C++ ULD library is not built here")
@pytest.mark.parametrize("k", [None, 1, 40, 500])
def test_cpp_sorted_l1_matches_torch_with_threads(k):
    """The C++ radix-sort kernel against the torch.sort path, rows split over 2 threads;
    ties and exact zeros (underflowed probabilities), either side wider."""
    g = torch.Generator().manual_seed(0)
    torch.set_num_threads(2)
    for c, w1, w2 in ((37, 300, 211), (16, 97, 400), (5, 1, 3)):
        x = torch.softmax(torch.randn(c, w1, generator=g) * 6, dim=1)
        y = torch.softmax(torch.randn(c, w2, generator=g) * 6, dim=1)
        x[:, ::7] = 0.0
        x[:, 1::11] = x[:, 2:3]  # ties
        y[:, ::5] = 0.0
        cx, cy = torch.rand(c, generator=g) + 0.1, torch.rand(c, generator=g) + 0.1
        ws = rows.Workspace(c, x.device)
        out_t = torch.full((c, w1), float("nan"))
        loss_t = rows.sorted_l1(x, cx, y.clone(), cy, out_t, k, "torch", ws)
        ws.release()
        out_c = torch.full((c, w1), float("nan"))
        loss_c = rows.sorted_l1(x, cx, y.clone(), cy, out_c, k, "cpp", None)
        # the C++ kernel sums in float64, torch.sort's path in fp32: ~1e-6 apart
        torch.testing.assert_close(loss_c, loss_t, rtol=1e-5, atol=1e-7)
        assert not out_c.isnan().any()
        # signs agree except where tied values swap ranks (then both are valid subgradients)
        assert (out_c != out_t).float().mean() < 0.02
        torch.testing.assert_close(rows.rowdot(x, out_c), rows.rowdot(x, out_t), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.skipif("cpp" not in IMPLS, reason="the C++ ULD library is not built here")
@pytest.mark.parametrize("beta", [0.0, 1e-50, 0.5, 1.0 - 1e-12, 1.0])
@pytest.mark.parametrize("k", [None, 7])
def test_cpp_hybrid_matches_torch_with_threads(beta, k):
    """The C++ hybrid row pass (columns gathered inside each row) against the torch path
    (gathered buffers, index_add back), rows over 2 threads: underflowed probabilities (the
    1e-8 clamp), a student id that two teacher ids map to, no free teacher column, and betas
    that round to 0 or 1 in fp32 (still the mixture, not a KL)."""
    import types

    from kdkernels.uld.logits import hybrid_columns

    g = torch.Generator().manual_seed(1)
    torch.set_num_threads(2)
    for c, vs, vt, dup, all_matched in ((33, 173, 211, True, False), (6, 40, 23, False, True)):
        x = torch.softmax(torch.randn(c, vs, generator=g) * 5, dim=1)
        y = torch.softmax(torch.randn(c, vt, generator=g) * 5, dim=1)
        x[:, ::9] = 0.0
        y[:, ::13] = 0.0
        vmap = torch.full((vt,), -1, dtype=torch.long)
        n = vt if all_matched else vt // 2
        t_ids = torch.randperm(vt, generator=g)[:n]
        vmap[t_ids] = torch.randperm(vs, generator=g)[:n]
        if dup:
            vmap[t_ids[1]] = vmap[t_ids[0]]
        cols = dict(zip(("s_matched", "t_matched", "s_free", "t_free"),
                        hybrid_columns(vmap, vs), strict=True))
        cfg = types.SimpleNamespace(mw=0.6, uw=0.4, beta=beta, top_k=k, **cols)
        cx, cy = torch.rand(c, generator=g) + 0.1, torch.rand(c, generator=g) + 0.1
        outs, losses = {}, {}
        for impl in ("torch", "cpp"):
            ws = rows.Workspace(c, x.device)
            outs[impl] = torch.full((c, vs), float("nan"))
            losses[impl] = rows.hybrid(x, cx, y, cy, types.SimpleNamespace(impl=impl, **vars(cfg)),
                                       outs[impl], True, ws)
            ws.release()
        # fp32 logs on both sides (Sleef in both); the C++ pass sums in float64: ~1e-6 apart
        torch.testing.assert_close(losses["cpp"], losses["torch"], rtol=2e-5, atol=1e-6)
        assert not outs["cpp"].isnan().any()
        # matched columns: the same JSD gradient; free columns: signs, which tied values may
        # swap (both valid subgradients), so compare their contraction with x as well
        m = cols["s_matched"]
        torch.testing.assert_close(outs["cpp"][:, m], outs["torch"][:, m], rtol=2e-5, atol=1e-5)
        assert (outs["cpp"] != outs["torch"]).float().mean() < 0.02
        torch.testing.assert_close(rows.rowdot(x, outs["cpp"]), rows.rowdot(x, outs["torch"]),
                                   rtol=1e-5, atol=1e-6)
        # without a gradient the output is not written
        poison = torch.full((c, vs), float("nan"))
        loss = rows.hybrid(x, cx, y, cy, types.SimpleNamespace(impl="cpp", **vars(cfg)), poison,
                           False, None)
        torch.testing.assert_close(loss, losses["cpp"], rtol=0, atol=0)
        assert poison.isnan().all()


# ----------------------------------------------------------------------------- top-k


def _topk_l1(p: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """[G]: the top-k sorted L1 plus the tails' difference, by autograd-able torch ops."""
    ps = p.topk(min(k, p.shape[-1]), dim=-1).values
    qs = q.topk(min(k, q.shape[-1]), dim=-1).values
    tail = (p.sum(-1) - ps.sum(-1)) - (q.sum(-1) - qs.sum(-1))
    w = max(ps.shape[-1], qs.shape[-1])
    ps = torch.nn.functional.pad(ps, (0, w - ps.shape[-1]))
    qs = torch.nn.functional.pad(qs, (0, w - qs.shape[-1]))
    return (ps - qs).abs().sum(-1) + tail.abs()


def _topk_materialised(k: int):
    """uld_loss's plain / hybrid loss with the sorted L1 replaced by _topk_l1 (mean only)."""

    def loss_fn(zs, zt, *args, vocab_map=None, merge="observed", **kw):
        from kdkernels.uld.logits import generalized_jsd, hybrid_weights

        assert not kw, kw
        groups = align_batch(*args, merge=merge)
        s, t = groups.student, groups.teacher
        P = merged_rows(zs.reshape(-1, zs.shape[-1]), s.base_rows, s.scalar_rows,
                        s.scalar_tokens, s.scalar_group, 1.0, torch.float64)
        Q = merged_rows(zt.reshape(-1, zt.shape[-1]), t.base_rows, t.scalar_rows,
                        t.scalar_tokens, t.scalar_group, 1.0, torch.float64)
        if vocab_map is None:
            per_group = _topk_l1(P, Q, k)
        else:
            mw, uw = hybrid_weights(vocab_map, None, None)
            tm = torch.nonzero(vocab_map >= 0).squeeze(1)
            sm = vocab_map[tm]
            free = torch.ones(P.shape[-1], dtype=torch.bool)
            free[sm] = False
            per_group = mw * generalized_jsd(P[:, sm], Q[:, tm], 0.5) + uw * _topk_l1(
                P[:, free], Q[:, vocab_map < 0], k)
        per_sample = torch.zeros(zs.shape[0], dtype=torch.float64).index_add(
            0, groups.sample, per_group)
        return (per_sample / groups.groups_per_sample.clamp_min(1)).mean()

    return loss_fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hybrid", [False, True], ids=["plain", "hybrid"])
def test_top_k_variant(hybrid, impl):
    """K >= both widths: the full loss. Smaller K: a lower bound whose gradient is autograd's
    of its own formula on materialised logits."""
    batch = _batch(21, 4, VS, VT)
    kw = {"vocab_map": _vocab_map(VS, VT, 5)} if hybrid else {}
    dtypes = (torch.float32,) if impl == "cpp" else (torch.float64, torch.float32)
    for dtype in dtypes:
        m = _model(batch, VS, VT, DS, DT, seed=12, dtype=dtype)
        full = _fused(m, batch, True, impl=impl, **kw)
        _check(_fused(m, batch, True, impl=impl, uld_top_k=VT, **kw), full,
               1e-6 if dtype == torch.float32 else 1e-12)
        for k in (1, 4, 17, 60):
            ours = _fused(m, batch, True, impl=impl, uld_top_k=k, chunk_size=3, **kw)
            assert ours[0] <= full[0] * (1 + 1e-6)
            ref = _materialised(m, batch, True, loss_fn=_topk_materialised(k), **kw)
            _check(ours, ref, TOL[dtype])


# ----------------------------------------------------------------------------- memory


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """The shape of every tensor an aten op returns in fresh memory."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hybrid", [False, True], ids=["plain", "hybrid"])
def test_no_tensor_spans_the_tokens_and_the_vocabulary(hybrid, impl):
    """Every vocabulary-wide tensor has at most a chunk of rows (besides the [V, D] head
    gradient): never [groups, V] logits, probabilities or sort buffers."""
    batch = synthetic_batch(31, 6, VS, VT, max_bytes=30, prompt_max=3)
    kw = {"vocab_map": _vocab_map(VS, VT, 6)} if hybrid else {}
    m = _model(batch, VS, VT, DS, DT, seed=13, dtype=torch.float32)
    n_groups = align_batch(*_args(batch, True)).num_groups
    chunk = 3
    assert n_groups > 5 * chunk
    with _Allocations() as seen:
        _fused(m, batch, True, impl=impl, chunk_size=chunk, ce_weight=0.2, **kw)
    widths = {VS, VT}
    if hybrid:
        vmap = kw["vocab_map"]
        n_m = int((vmap >= 0).sum())
        widths |= {n_m, VS - n_m, VT - n_m}
    wide = [s for s in seen.shapes if len(s) == 2 and widths & set(s)]
    assert wide, "no vocabulary-wide buffer recorded"
    for s in wide:
        assert s in ((VS, DS), (VT, DT)) or min(s) <= chunk, s


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    sys.path.insert(0, {root!r})
    from kdkernels.uld.fused import fused_linear_uld_loss
    torch.set_num_threads(1)
    B, L, Vs, Vt, Ds, Dt = 4, 320, 12000, 20000, 64, 64
    g = torch.Generator().manual_seed(0)
    ids_s = torch.randint(0, Vs, (B, L), generator=g)
    ids_t = torch.randint(0, Vt, (B, L), generator=g)
    lab_s, lab_t = ids_s.clone(), ids_t.clone()
    lab_s[:, :8] = -100
    lab_t[:, :8] = -100
    h = torch.randn(B, L, Ds, generator=g).requires_grad_()
    w = (torch.randn(Vs, Ds, generator=g) / 4).requires_grad_()
    gt, u = torch.randn(B, L, Dt, generator=g), torch.randn(Vt, Dt, generator=g) / 4
    args = (h, w, gt, u, lab_s, lab_t, ids_s, ids_t)
    kw = dict(max_workspace_bytes={budget}, impl={impl!r}, ce_weight=0.1)
    # warm-up on a tiny head (kernels, thread pools), touching none of the big buffers
    small = [h[:, :12].detach().requires_grad_(), w[:50].detach(), gt[:, :12], u[:70],
             *(t[:, :12] % 50 for t in args[4:6]), *(t[:, :12] % 50 for t in args[6:])]
    fused_linear_uld_loss(*small, **kw).backward()
    def status(key):
        return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
    try:  # reset the high-water mark (Linux >= 4.0): the peak of this call alone
        open("/proc/self/clear_refs", "w").write("5")
        reset = True
    except OSError:
        reset = False
    base = status("VmRSS")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fused_linear_uld_loss(*args, **kw).backward()
    peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({{"base": base, "peak": peak, "reset": reset, "before": before}}))
""")


@pytest.mark.parametrize("impl", IMPLS)
def test_peak_memory_is_the_inputs_plus_the_workspace(impl):
    """Fresh process: the peak RSS above the inputs is the workspace plus the gradients,
    far below the [tokens x vocab] logits a materialising loss holds (here 156 MiB for the
    two sides' fp32 logits alone, before their softmaxes and sorted copies)."""
    budget = 8 * 2**20
    code = _RSS_SCRIPT.format(root=str(ROOT), budget=budget, impl=impl)
    # a fixed mmap threshold: freed buffers go back to the OS, so RSS tracks live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not r["reset"] and r["before"] >= r["peak"]:
        pytest.skip("the process peaked before the call and its high-water mark cannot be reset")
    above = r["peak"] - r["base"]
    n_rows, vs, vt, ds = 4 * 320, 12000, 20000, 64
    logits_mib = n_rows * (vs + vt) * 4 / 2**20
    grads_mib = (vs * ds + n_rows * ds) * 4 / 2**20  # fp32 grad_W accumulator, grad_hidden
    slack = 12  # per-row vectors, allocator rounding, the sort's own per-thread scratch
    assert above <= budget / 2**20 + grads_mib + slack, (above, r)
    assert above < logits_mib / 4


# ----------------------------------------------------------------------------- errors


def test_bad_options_name_the_argument():
    batch = _batch(2, 2, VS, VT)
    m = _model(batch, VS, VT, DS, DT, seed=1, dtype=torch.float32)
    args = (m["h"], m["w"], m["g"], m["u"], *_args(batch, True))
    for kw, word in (({"chunk_size": 0}, "chunk_size"), ({"uld_top_k": 0}, "uld_top_k"),
                     ({"max_workspace_bytes": -1}, "max_workspace_bytes"),
                     ({"impl": "triton"}, "impl"), ({"merge": "median"}, "merge"),
                     ({"student_temperature": 0.0}, "student_temperature"),
                     ({"vocab_map": torch.zeros(VT + 1, dtype=torch.long)}, "vocab_map"),
                     ({"reduction": "avg"}, "reduction")):
        with pytest.raises((ValueError, TypeError), match=word):
            fused_linear_uld_loss(*args, **kw)
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_uld_loss(m["h"], m["w"][:, :3], *args[2:])
    with pytest.raises(ValueError, match="student_labels"):
        fused_linear_uld_loss(*args[:4], batch["student_labels"][:, :2], *args[5:])


# ----------------------------------------------------------------------------- bench


def test_bench_providers_run_and_agree():
    """bench/uld.py's providers at its smoke shape, in this process (no workers): the fused
    losses equal TRL's ULDLoss on the same inputs (plain and hybrid)."""
    pytest.importorskip("trl.experimental.gold.gold_trainer")
    sys.path.insert(0, str(ROOT))
    from bench import uld

    inp = uld.make_inputs(uld.SMOKE, torch.float32, seed=1)
    losses = {}
    for name in uld.PROVIDERS:
        uld.clear_grads(inp)
        out = uld.build(name, inp)()
        if name != "floor":
            losses[name] = float(out)
            assert inp["w"].grad is not None and torch.isfinite(inp["w"].grad).all()
    for a, b in uld.PAIRS:
        assert abs(losses[a] - losses[b]) <= 1e-5 * abs(losses[b]), (a, b, losses)
    assert losses["topk-256"] <= losses["fused"] * (1 + 1e-6)


def _to(m: dict, device: str, dtype: torch.dtype) -> dict:
    return {k: None if v is None else v.to(device=device, dtype=dtype) for k, v in m.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["plain", "hybrid_fixed_bayes", "ce_T_sum"])
def test_cuda_matches_materialised_loss(case, dtype):
    """The GPU path (torch.sort on each chunk, GEMMs in the input dtype on the device) against
    the float64 loss on materialised logits of the same values on the CPU. fp32: 1e-5 as on
    the CPU (TF32 is off by default for matmuls); bf16: 1e-2, the CPU's bf16 bound (the
    gradients' final rounding to bf16, and sort-order flips between bf16-close values)."""
    batch = _batch(3, 4, VS, VT)
    kw = _kw(CASES[case], _vocab_map(VS, VT, 1))
    m = _model(batch, VS, VT, DS, DT, seed=5, dtype=dtype)
    ref = _materialised(m, batch, True, **kw)
    dev_batch = {k: v.cuda() for k, v in batch.items()}
    if "vocab_map" in kw:
        kw["vocab_map"] = kw["vocab_map"].cuda()
    ours = _fused(_to(m, "cuda", dtype), dev_batch, True, impl="auto", chunk_size=5, **kw)
    _check(tuple(None if x is None else x.cpu() for x in ours), ref, TOL[dtype])
