"""Input builders and error measures shared by the test modules."""

from __future__ import annotations

import torch

from kdkernels.reference import reference_fused_linear_kd_loss, reference_kd_loss


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||x - ref|| / ||ref|| (absolute when ref is all zeros)."""
    x, ref = x.double(), ref.double()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


def make_fused(n, vs, vt, ds, dt, dtype, *, bias=False, logit_scale=3.0, ignore_frac=0.0,
               seed=0, lead=None):
    """Random fused-linear inputs whose logits have std ~ logit_scale."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if lead is None else lead

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * std)

    h = rnd(*shape, ds).to(dtype).requires_grad_()
    w = rnd(vs, ds, std=logit_scale / ds**0.5).to(dtype).requires_grad_()
    g = rnd(*shape, dt).to(dtype)
    u = rnd(vt, dt, std=logit_scale / dt**0.5).to(dtype)
    labels = torch.randint(0, min(vs, vt), shape, generator=gen)
    if ignore_frac > 0:
        drop = torch.rand(shape, generator=gen) < ignore_frac
        labels = torch.where(drop, torch.full_like(labels, -100), labels)
    bs = rnd(vs, std=0.5).to(dtype).requires_grad_() if bias else None
    bt = rnd(vt, std=0.5).to(dtype) if bias else None
    return dict(h=h, w=w, g=g, u=u, labels=labels, bs=bs, bt=bt)


def run_fused(fn, inp, grad_output=None, **opts):
    """Loss and gradients (h, w, bs) of fn = fused_linear_kd_loss or its reference."""
    h = inp["h"].detach().clone().requires_grad_()
    w = inp["w"].detach().clone().requires_grad_()
    bs = None if inp["bs"] is None else inp["bs"].detach().clone().requires_grad_()
    if fn is reference_fused_linear_kd_loss:
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        bs64 = None if bs is None else bs.detach().double().requires_grad_()
        loss = fn(h64, w64, inp["g"].double(), inp["u"].double(), inp["labels"],
                  student_bias=bs64, teacher_bias=None if inp["bt"] is None
                  else inp["bt"].double(), **opts)["loss"]
        h, w, bs = h64, w64, bs64
    else:
        loss = fn(h, w, inp["g"], inp["u"], inp["labels"], student_bias=bs,
                  teacher_bias=inp["bt"], **opts)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), h.grad, w.grad, None if bs is None else bs.grad


def naive_fused(inp, **opts):
    """A same-dtype naive PyTorch loss (what a user would write), via the reference formulas
    evaluated in the input dtype: the yardstick for bf16 accuracy."""
    h = inp["h"].detach().clone().requires_grad_()
    w = inp["w"].detach().clone().requires_grad_()
    bs = None if inp["bs"] is None else inp["bs"].detach().clone().requires_grad_()
    zs = h.reshape(-1, h.shape[-1]) @ w.t()
    zt = inp["g"].reshape(-1, inp["g"].shape[-1]) @ inp["u"].t()
    if bs is not None:
        zs = zs + bs
        zt = zt + inp["bt"]
    loss = reference_kd_loss(zs, zt, inp["labels"], compute_dtype=zs.dtype, **opts)["loss"]
    return loss, h, w, bs
