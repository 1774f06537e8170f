"""Options that change between calls of a compiled function (issue 23): a temperature
schedule, a beta sweep, ... under torch.compile(fullgraph=True), for the four losses.

Dynamo compiles a Python float argument as a constant first; when a call brings another
value it recompiles once with the float symbolic (automatic dynamic), and that graph serves
every later value. The float options cross the op boundary as 0-d tensors
(engine/custom_ops.py), so nothing specialises them again: a schedule of any length is
exactly 2 compiles. Each step equals eager, loss and gradients: the op runs the eager
Functions' code with the very same float64 option values, and the graph around it
(``.sum() * 1.5`` and the autograd scaling) is the same arithmetic as eager's.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo.config
import torch._functorch.config
from torch._dynamo.testing import CompileCounterWithBackend

import kdkernels

from .test_topk import make_case

# aot_eager runs dynamo and AOTAutograd, where the tensorify pass decides whether a float
# stays symbolic or is specialised (a guard on its value): that is what the counts test.
# inductor adds a C++ build per graph on CPU (seconds each): one schedule runs it below.
BACKEND = "aot_eager"
EXACT = {"rtol": 0.0, "atol": 0.0}
# inductor generates its own code for the graph around the op (the ``* 1.5`` scaling and
# the gradient products) and may contract or reorder them: a few ulps, as test_compile.py.
TIGHT = {"rtol": 1e-6, "atol": 1e-7}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Counts start from a clean slate: no compiled code or automatic-dynamic state from an
    earlier test, no profile-guided dynamism from an earlier run (local PGO would mark a
    float dynamic on its first call), no stale on-disk backward (see test_compile.py)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(automatic_dynamic_local_pgo=False,
                                    automatic_dynamic_remote_pgo=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def _dense():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 8, generator=gen)
    w = torch.randn(37, 8, generator=gen) * 0.5
    g = torch.randn(2, 3, 12, generator=gen)
    u = torch.randn(37, 12, generator=gen) * 0.5
    labels = torch.randint(0, 37, (2, 3), generator=gen)
    labels[0, 1] = -100
    return h, w, g, u, labels


def _fused(opts):
    h, w, g, u, labels = _dense()
    student = dict(h=h.requires_grad_(), w=w.requires_grad_())

    def loss(s, **o):
        return kdkernels.fused_linear_kd_loss(s["h"], s["w"], g, u, labels, chunk_size=4,
                                              **opts, **o)
    return student, loss


def _logits(opts):
    h, w, g, u, labels = _dense()
    zs, zt = (h @ w.T).requires_grad_(), g @ u.T

    def loss(s, **o):
        return kdkernels.kd_loss(s["zs"], zt, labels, chunk_size=4, **opts, **o)
    return dict(zs=zs), loss


def _topk_case():
    return make_case(6, 41, 8, 5, seed=3, lead=(2, 3))


def _fused_topk(opts):
    c = _topk_case()
    student = dict(h=c["h"].clone().requires_grad_(), w=c["w"].clone().requires_grad_())

    def loss(s, **o):
        return kdkernels.fused_linear_topk_kd_loss(s["h"], s["w"], c["ids"], c["lps"],
                                                   c["labels"], chunk_size=4, **opts, **o)
    return student, loss


def _logits_topk(opts):
    c = _topk_case()
    zs = (c["h"] @ c["w"].T).detach().requires_grad_()

    def loss(s, **o):
        return kdkernels.topk_kd_loss(s["zs"], c["ids"], c["lps"], c["labels"], **opts, **o)
    return dict(zs=zs), loss


LOSSES: dict[str, Callable] = {"fused_linear_kd_loss": _fused, "kd_loss": _logits,
                               "fused_linear_topk_kd_loss": _fused_topk,
                               "topk_kd_loss": _logits_topk}
TOPK = ("fused_linear_topk_kd_loss", "topk_kd_loss")

# Five values of each float option, and the divergence that reads it.
VALUES = {"temperature": [1.0, 1.5, 2.0, 0.7, 3.0], "beta": [0.1, 0.3, 0.5, 0.7, 0.9],
          "alpha": [0.2, 0.4, 0.6, 0.8, 0.95], "skew": [0.1, 0.2, 0.3, 0.4, 0.5],
          "kd_weight": [1.0, 0.8, 0.5, 0.2, 0.0], "ce_weight": [0.0, 0.2, 0.5, 0.9, 1.0],
          "student_logit_scale": [1.0, 0.5, 2.0, 0.25, 3.0],
          "teacher_logit_scale": [1.0, 2.0, 0.5, 3.0, 0.25],
          "num_items": [3.0, 4.0, 7.5, 5.0, 11.0]}
DIVERGENCE = {"beta": "jsd", "alpha": "alpha", "skew": "skew_reverse_kl"}
COMMON = ("temperature", "kd_weight", "ce_weight", "student_logit_scale", "num_items")


def _steps(names):
    return list(zip(*(VALUES[n] for n in names), strict=True))


def _eager(loss, student, kwargs):
    """(loss, gradients) of the eager loss for the options ``kwargs``."""
    for t in student.values():
        t.grad = None
    out = loss(student, **kwargs).sum() * 1.5
    out.backward()
    return out.detach(), [t.grad.clone() for t in student.values()]


def _run_schedule(loss, student, names, steps, backend=BACKEND, tol=EXACT):
    """Calls the compiled loss with each step's values (positional floats: what dynamo
    sees as a changing Python float), checks every step against eager; returns the number
    of graphs compiled."""
    counter = CompileCounterWithBackend(backend)

    def step(s, *values):
        return loss(s, **dict(zip(names, values, strict=True))).sum() * 1.5

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for values in steps:
        for t in student.values():
            t.grad = None
        got = compiled(student, *values)
        got.backward()
        got_grads = [t.grad.clone() for t in student.values()]
        want, want_grads = _eager(loss, student, dict(zip(names, values, strict=True)))
        for a, b in zip((got.detach(), *got_grads), (want, *want_grads), strict=True):
            torch.testing.assert_close(a, b, **tol, msg=lambda m, v=values: f"{v}: {m}")
    return counter.frame_count


# kd_loss: one option per schedule, each alone (which option specialised, if one did).
SINGLE = [(n, DIVERGENCE.get(n, "forward_kl")) for n in VALUES if n != "ce_weight"]


@pytest.mark.parametrize(("name", "divergence"), SINGLE)
def test_kd_loss_schedule_of_one_option(name, divergence):
    student, loss = _logits(dict(divergence=divergence))
    names = ("kd_weight", "ce_weight") if name == "kd_weight" else (name,)
    # The first value compiled as a constant, the second as a symbol serving all the rest.
    assert _run_schedule(loss, student, names, _steps(names)) == 2


# The other losses: every float option changes at every step (each divergence parameter
# with its divergence). One specialised option would make it 5 compiles.
@pytest.mark.parametrize("loss_name", [n for n in LOSSES if n != "kd_loss"])
@pytest.mark.parametrize("param", list(DIVERGENCE))
def test_schedule_of_every_option(loss_name, param):
    student, loss = LOSSES[loss_name](dict(divergence=DIVERGENCE[param]))
    teacher = () if loss_name in TOPK else ("teacher_logit_scale",)  # no teacher logits
    names = (param, *COMMON, *teacher)
    assert _run_schedule(loss, student, names, _steps(names)) == 2


@pytest.mark.parametrize("loss_name", ["fused_linear_kd_loss", "fused_linear_topk_kd_loss"])
def test_schedule_with_reduction_none(loss_name):
    """reduction='none': the fused backward op recomputes the gradients from the option
    tensors that forward was given (symbolic in the second graph)."""
    student, loss = LOSSES[loss_name](dict(divergence="jsd", reduction="none"))
    names = ("beta", "temperature", "kd_weight", "ce_weight")
    assert _run_schedule(loss, student, names, _steps(names)) == 2


def test_temperature_schedule_under_inductor():
    """The real backend: inductor keeps the symbolic temperature too (one C++ build per
    graph, so two), and its graph around the op is a few ulps from eager's."""
    student, loss = _fused({})
    steps = _steps(("temperature",))
    assert _run_schedule(loss, student, ("temperature",), steps, "inductor", TIGHT) == 2


def test_int_then_float_temperature():
    """Ints (1, 2, 3) then floats: the int 1 a constant, the int 2 a symbol (SymInt) that
    serves 3, then the floats a symbol: 3 graphs, each value as eager."""
    student, loss = _logits({})
    steps = [(1,), (2,), (3,), (2.5,), (3.5,)]
    assert _run_schedule(loss, student, ("temperature",), steps) == 3


BAD = {"temperature": (-1.0, r"temperature must be > 0\.0, got -1\.0"),
       "beta": (1.5, r"beta must be <= 1\.0, got 1\.5"),
       "alpha": (1.0, r"alpha must be in the open interval \(0, 1\), got 1\.0"),
       "skew": (-0.5, r"skew must be >= 0\.0, got -0\.5"),
       "kd_weight": (-2.0, r"kd_weight must be >= 0\.0, got -2\.0"),
       "ce_weight": (float("inf"), r"ce_weight must be finite, got inf"),
       "student_logit_scale": (0.0, r"student_logit_scale must be > 0\.0, got 0\.0"),
       "num_items": (-3.0, r"num_items must be > 0\.0, got -3\.0")}


@pytest.mark.parametrize("loss_name", ["kd_loss", "topk_kd_loss"])
def test_bad_value_on_a_later_call_raises_naming_the_option(loss_name):
    """The symbolic graph cannot check a value while tracing: the op checks the concrete
    values when the graph runs and raises the eager error, with no recompile; the next good
    values run as before."""
    student, loss = LOSSES[loss_name]({})
    names = tuple(BAD)
    counter = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(lambda s, *v: loss(s, **dict(zip(names, v, strict=True))),
                             backend=counter, fullgraph=True)
    steps = _steps(names)
    for values in steps[:2]:
        compiled(student, *values)
    assert counter.frame_count == 2
    for i, (bad, message) in enumerate(BAD.values()):
        values = (*steps[2][:i], bad, *steps[2][i + 1:])
        with pytest.raises(ValueError, match=message):
            compiled(student, *values)
    assert counter.frame_count == 2  # raised by the symbolic graph's op, not by a retrace
    # NaN is the exception: dynamo guards every float input against NaN (an implicit
    # guard of its own), so a NaN is compiled as a constant, which the op checks too.
    with pytest.raises(ValueError, match="temperature must be finite, got nan"):
        compiled(student, float("nan"), *steps[2][1:])
    assert counter.frame_count == 3
    want, _ = _eager(loss, student, dict(zip(names, steps[2], strict=True)))
    torch.testing.assert_close(compiled(student, *steps[2]).sum() * 1.5, want, **EXACT)


def test_bad_constant_option_raises_under_compile():
    """A bad constant (no schedule) raises the eager error too, from the op."""
    student, loss = _logits({})
    compiled = torch.compile(lambda s: loss(s, temperature=-1.0), backend=BACKEND,
                             fullgraph=True)
    with pytest.raises(ValueError, match=r"temperature must be > 0\.0, got -1\.0"):
        compiled(student)


def test_jsd_fold_under_a_tail_is_decided_when_the_graph_runs():
    """jsd at beta 0 is forward KL, the one divergence of tail='zero'; at another beta it is
    not defined there. With a symbolic beta this is decided by the op, per value."""
    student, loss = _logits_topk(dict(divergence="jsd", tail="zero"))
    counter = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(lambda s, b: loss(s, beta=b), backend=counter, fullgraph=True)
    want, _ = _eager(loss, student, dict(beta=0.0))
    torch.testing.assert_close(compiled(student, 0.0).sum() * 1.5, want, **EXACT)
    with pytest.raises(ValueError, match=r"divergence='jsd' is not defined under "
                                         r"tail='zero'"):
        compiled(student, 0.3)
    assert counter.frame_count == 2
    torch.testing.assert_close(compiled(student, 0.0).sum() * 1.5, want, **EXACT)
