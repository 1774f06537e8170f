"""One rank of a spawned gloo world for tests/test_topk_vocab_parallel.py.

``python -m tests._topk_tp_worker RANK WORLD PORT OUT``: runs every case of CASES twice on
uneven vocab shards, and the bad-input cases once, then saves what it saw to OUT. Inputs
come from a seed, so the test process rebuilds the full tensors itself.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import torch

from tests._dist import exit_worker

N, D, V, K = 29, 12, 211, 9  # V = 211 splits unevenly over 2 and 3 ranks
_BASE = dict(temperature=2.0, ce_weight=0.4, chunk_size=6)
CASES: dict[str, dict[str, Any]] = {
    "bucket_forward": dict(tail="bucket", divergence="forward_kl", **_BASE),
    "bucket_reverse": dict(tail="bucket", divergence="reverse_kl", **_BASE),
    "renormalize_reverse": dict(tail="renormalize", divergence="reverse_kl", **_BASE),
    "bucket_jsd": dict(tail="bucket", divergence="jsd", beta=0.3, **_BASE),
    "renormalize_alpha": dict(tail="renormalize", divergence="alpha", alpha=0.7, **_BASE),
    "bucket_skew_reverse": dict(tail="bucket", divergence="skew_reverse_kl", skew=0.4, **_BASE),
    "zero_softcap_sum": dict(tail="zero", student_softcap=5.0, reduction="sum", ce_weight=0.2),
    "bucket_logit_scale": dict(tail="bucket", divergence="forward_kl", student_logit_scale=0.5,
                               student_softcap=4.0, **_BASE),
    "none_logits": dict(tail="bucket", reduction="none", kind="logits", **_BASE),
}
CASES["signals_none"] = dict(tail="bucket", divergence="reverse_kl", reduction="none",
                             return_components=True, student_logit_scale=0.5, **_BASE)
BAD = {"id_out_of_range_one_rank": "rejected their inputs"}
SIGNALS = ("student_entropy", "label_logprob")


def split(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, the per-token signals) of a loss result, components or not."""
    if isinstance(out, torch.Tensor):
        return out, {}
    return out.loss, {k: getattr(out, k) for k in SIGNALS}


def widths(vocab: int, parts: int) -> list[int]:
    # deliberately uneven: the last rank holds the remainder plus a few rows more
    base = vocab // (parts + 1)
    w = [base] * (parts - 1)
    return w + [vocab - sum(w)]


def shard(parts: int, rank: int) -> tuple[int, int]:
    w = widths(V, parts)
    return sum(w[:rank]), sum(w[: rank + 1])


def make_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(N, D, generator=gen)
    w = torch.randn(V, D, generator=gen) * 0.6
    lp = torch.log_softmax(torch.randn(N, V, generator=gen) * 2, -1)
    top = lp.topk(K, -1)
    ids = top.indices.clone()
    ids[::4, K // 2:] = -1
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = -100
    # labels inside the teacher's ids on some rows, owned by various ranks
    labels[1::3] = ids[1::3, 0]
    return dict(h=h, w=w, ids=ids, lps=top.values, labels=labels)


def run(case: dict, x: dict, lo: int, hi: int, vp) -> dict[str, Any]:
    import kdkernels

    opts = {k: v for k, v in case.items() if k != "kind"}
    h = x["h"].clone().requires_grad_()
    w = x["w"][lo:hi].clone().requires_grad_()
    if case.get("kind") == "logits":
        z = (x["h"] @ x["w"][lo:hi].T).detach().requires_grad_()
        loss = kdkernels.topk_kd_loss(z, x["ids"], x["lps"], x["labels"], vocab_parallel=vp,
                                      **opts)
        loss.backward(torch.linspace(0.5, 1.5, N))
        return dict(loss=loss.detach(), grad_z=z.grad)
    loss, signals = split(kdkernels.fused_linear_topk_kd_loss(
        h, w, x["ids"], x["lps"], x["labels"], vocab_parallel=vp, **opts))
    loss.backward(torch.ones_like(loss))
    return dict(loss=loss.detach(), grad_h=h.grad, grad_w=w.grad, **signals)


def run_bad(name: str, x: dict, lo: int, hi: int, vp, rank: int, parts: int) -> str:
    import kdkernels

    ids = x["ids"].clone()
    if rank == parts - 1:
        ids[3, 0] = V + 5
    try:
        kdkernels.fused_linear_topk_kd_loss(x["h"], x["w"][lo:hi], ids, x["lps"],
                                            vocab_parallel=vp)
    except (ValueError, RuntimeError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def main(rank: int, parts: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    from kdkernels.parallel import VocabParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=parts)
    x = make_inputs()
    lo, hi = shard(parts, rank)
    results: dict[str, Any] = {"cases": {}, "bad": {}, "shard": (lo, hi)}
    try:
        for name, case in CASES.items():
            results["cases"][name] = [run(case, x, lo, hi, VocabParallel()) for _ in range(2)]
        for name in BAD:
            results["bad"][name] = run_bad(name, x, lo, hi, VocabParallel(), rank, parts)
    except Exception:
        results["crash"] = traceback.format_exc()
    torch.save(results, out_path)
    exit_worker()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
