"""The top-k losses under torch.compile(fullgraph=True) (one opaque custom op each, the same
numbers as eager) and torch.library.opcheck of their ops."""

from __future__ import annotations

import pytest
import torch
import torch._functorch.config

import kdkernels
from kdkernels.sparse.compiled import FUSED_TOPK_OP, LOGITS_TOPK_OP
from kdkernels.sparse.options import TopKOptions

from .test_topk import make_case


@pytest.fixture(autouse=True)
def _no_autograd_cache():
    # As in test_compile.py: the on-disk AOTAutograd cache would serve a stale backward.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("tail,div", [("bucket", dict()), ("renormalize", dict()),
                                      ("bucket", dict(divergence="jsd", beta=0.3)),
                                      ("renormalize", dict(divergence="alpha", alpha=0.8))])
def test_fused_fullgraph_matches_eager(reduction, tail, div):
    torch._dynamo.reset()
    case = make_case(15, 101, 16, 6, seed=1, lead=(3, 5))
    h = case["h"].clone().requires_grad_()
    w = case["w"].clone().requires_grad_()
    b = torch.randn(101, requires_grad=True)

    def loss_fn(h, w, b, ids, lps, labels):
        out = kdkernels.fused_linear_topk_kd_loss(h, w, ids, lps, labels, student_bias=b,
                                                  tail=tail, temperature=2.0, ce_weight=0.3,
                                                  student_logit_scale=0.5,
                                                  reduction=reduction, chunk_size=4, **div)
        return out.sum() * 1.5

    args = (case["ids"], case["lps"], case["labels"])
    got = torch.compile(loss_fn, fullgraph=True)(h, w, b, *args)
    got.backward()
    grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    want = loss_fn(h, w, b, *args)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for a, t in zip(grads, (h, w, b), strict=True):
        torch.testing.assert_close(a, t.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_fullgraph_matches_eager(reduction):
    torch._dynamo.reset()
    case = make_case(12, 67, 8, 5, seed=2)
    zs = (case["h"] @ case["w"].T).detach().requires_grad_()

    def loss_fn(zs, ids, lps, labels):
        out = kdkernels.topk_kd_loss(zs, ids, lps, labels, tail="zero", ce_weight=0.2,
                                     reduction=reduction, return_components=True)
        return out.loss.sum() * 0.5

    args = (case["ids"], case["lps"], case["labels"])
    got = torch.compile(loss_fn, fullgraph=True)(zs, *args)
    got.backward()
    grad = zs.grad.clone()
    zs.grad = None
    want = loss_fn(zs, *args)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, zs.grad, rtol=1e-6, atol=1e-7)


def test_compiled_checks_still_raise():
    torch._dynamo.reset()
    case = make_case(6, 31, 8, 4, seed=3)
    ids = case["ids"].clone()
    ids[1, 0] = 31

    def loss_fn(h, w, ids, lps):
        return kdkernels.fused_linear_topk_kd_loss(h, w, ids, lps)

    with pytest.raises(ValueError, match="teacher_ids must be < V = 31"):
        torch.compile(loss_fn, fullgraph=True)(case["h"], case["w"], ids, case["lps"])


def test_schemas_end_with_the_topk_options():
    names = [f.name for f in TopKOptions.__dataclass_fields__.values()]
    for op in (FUSED_TOPK_OP.op, FUSED_TOPK_OP.backward_op, LOGITS_TOPK_OP.op):
        args = [a.name for a in op._opoverload._schema.arguments]
        assert args[-len(names):] == names


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    case = make_case(7, 41, 8, 4, seed=4)
    opts = TopKOptions(ce_weight=0.5, reduction=reduction)
    h = case["h"].clone().requires_grad_()
    w = case["w"].clone().requires_grad_()
    lead = [h, w, None, case["ids"], case["lps"], case["labels"], [True, True, False],
            torch.float32]
    torch.library.opcheck(FUSED_TOPK_OP.op, (*lead, *FUSED_TOPK_OP.schema.option_args(opts)))
    zs = (case["h"] @ case["w"].T).detach().requires_grad_()
    torch.library.opcheck(LOGITS_TOPK_OP.op, (zs, case["ids"], case["lps"], case["labels"],
                                              True, *LOGITS_TOPK_OP.schema.option_args(opts)))
