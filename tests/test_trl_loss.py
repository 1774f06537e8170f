"""fused_divergence_loss against TRL's own _chunked_divergence_loss, on the same inputs:
loss, gradients, the student entropy sum and the valid count (fp32, relative 1e-5)."""

from __future__ import annotations

import pytest
import torch

from kdkernels.integrations.trl_loss import check_extra_options, fused_divergence_loss

_chunked_divergence_loss = pytest.importorskip(
    "trl.trainer.distillation_trainer", reason="trl>=1.16 is in the dev extra"
)._chunked_divergence_loss

B, K, DS, DT, V = 3, 7, 16, 24, 97


def _inputs(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, K, DS, generator=g).requires_grad_(True)
    w = (torch.randn(V, DS, generator=g) * DS ** -0.5 * 3).requires_grad_(True)
    t = torch.randn(B, K, DT, generator=g)
    u = torch.randn(V, DT, generator=g) * DT ** -0.5 * 3
    mask = torch.ones(B, K, dtype=torch.long)
    mask[0, 5:] = 0  # right padding
    mask[2, :2] = 0  # a tool output inside a completion
    bs = (torch.randn(V, generator=g) * 0.5).requires_grad_(True) if bias else None
    bt = torch.randn(V, generator=g) * 0.5 if bias else None
    return h, w, t, u, mask, bs, bt


def _run(fn, case, num_items, **extra):
    h, w, t, u, mask, bs, bt = _inputs(case.get("bias", False))
    loss, entropy, n = fn(h, t, w, u, mask, case["beta"], num_items_in_batch=num_items,
                          student_lm_head_bias=bs, teacher_lm_head_bias=bt,
                          student_logit_scale=case.get("scale", 1.0),
                          teacher_logit_scale=case.get("t_scale", 1.0),
                          student_final_logit_softcapping=case.get("cap"),
                          teacher_final_logit_softcapping=case.get("t_cap"),
                          temperature=case.get("T", 1.0), **extra)
    loss.backward()
    grads = [x.grad for x in (h, w, bs) if x is not None]
    return loss.detach(), entropy, n, grads


CASES = {
    "forward_kl": dict(beta=0.0),
    "jsd": dict(beta=0.5),
    "reverse_kl": dict(beta=1.0),
    "jsd_T": dict(beta=0.3, T=1.7),
    "forward_kl_T_bias": dict(beta=0.0, T=0.6, bias=True),
    "reverse_kl_softcap": dict(beta=1.0, cap=2.5, t_cap=4.0),
    "jsd_logit_scale": dict(beta=0.5, scale=0.25, t_scale=1 / 3),
    "forward_kl_scale_softcap_T_bias": dict(beta=0.0, scale=0.5, t_scale=2.0, cap=3.0,
                                            t_cap=3.0, T=1.3, bias=True),
}


@pytest.mark.parametrize("num_items", [None, torch.tensor(40.0)], ids=["mean", "num_items"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_trl_chunked_divergence_loss(name, num_items):
    case = CASES[name]
    ours = _run(fused_divergence_loss, case, num_items)
    theirs = _run(_chunked_divergence_loss, case, num_items)
    close = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[0], theirs[0], **close)
    torch.testing.assert_close(ours[1], theirs[1], **close)  # student entropy sum
    assert int(ours[2]) == int(theirs[2]) == B * K - 4
    assert len(ours[3]) == len(theirs[3])
    for a, b in zip(ours[3], theirs[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert float(ours[0]) > 0 and not ours[1].requires_grad


def test_all_masked_gives_zero_like_trl():
    h, w, t, u, mask, _, _ = _inputs(False)
    loss, entropy, n = fused_divergence_loss(h, t, w, u, torch.zeros_like(mask), 0.5)
    loss.backward()
    assert float(loss) == 0.0 and int(n) == 0 and float(entropy) == 0.0
    assert torch.count_nonzero(h.grad) == 0


def test_t2_and_hard_labels_reach_the_loss():
    case = dict(beta=0.0, T=2.0)
    plain = _run(fused_divergence_loss, case, None)[0]
    assert torch.allclose(_run(fused_divergence_loss, case, None, scale_by_t2=True)[0],
                          4 * plain, rtol=1e-6)
    labels = torch.arange(B * K).reshape(B, K) % V
    mixed = _run(fused_divergence_loss, case, None, labels=labels, ce_weight=0.5,
                 kd_weight=0.5)[0]
    assert not torch.allclose(mixed, 0.5 * plain)


def test_bad_options_are_named():
    with pytest.raises(TypeError, match="unknown loss option.*beta_typo"):
        check_extra_options({"beta_typo": 1})
    with pytest.raises(ValueError, match="divergence"):
        check_extra_options({"divergence": "magic"})
    with pytest.raises(ValueError, match="ce_weight > 0 needs labels"):
        _run(fused_divergence_loss, dict(beta=0.0), None, ce_weight=1.0)
    h, w, t, u, mask, _, _ = _inputs(False)
    with pytest.raises(ValueError, match="labels must have the completion mask's shape"):
        fused_divergence_loss(h, t, w, u, mask, 0.0, labels=torch.zeros(B, K + 1))


def test_extra_options_are_the_options_trl_does_not_set():
    from kdkernels.integrations.trl_loss import (
        CONTRACT_OPTIONS,
        TRL_ARGUMENTS,
        extra_options,
    )
    from kdkernels.options import option_fields

    extra = extra_options()
    assert {"divergence", "skew", "alpha", "scale_by_t2", "kd_weight", "ce_weight", "impl",
            "chunk_size", "max_workspace_bytes"} <= set(extra)
    assert sorted((*extra, *TRL_ARGUMENTS, *CONTRACT_OPTIONS)) == sorted(
        f.name for f in option_fields())
    assert check_extra_options({})["divergence"] == "jsd"
    assert check_extra_options({"divergence": None})["divergence"] == "jsd"
    with pytest.raises(TypeError, match="unknown loss option.*temperature"):
        check_extra_options({"temperature": 2.0})  # TRL's own argument, not an extra


def test_fsdp2_dtensor_heads_match_trl(tmp_path):
    # Two gloo ranks, heads sharded over the vocabulary as FSDP2 holds them: gathered once
    # (full_tensor) as TRL does, the gradients reduced back to the shards.
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    root = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-m", "tests._trl_dtensor_worker", str(r), "2",
                               str(port), str(out)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    saved = torch.load(out)
    ours, theirs = saved["ours"], saved["trl"]
    assert ours["n"] == theirs["n"] == 8
    for key in ("loss", "grad_h", "grad_w", "grad_b", "entropy"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-7, msg=key)
