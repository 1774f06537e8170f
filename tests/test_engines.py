"""Every trainer integration under the real training engines (issue 23): DDP, DeepSpeed ZeRO-3,
FSDP1 and FSDP2, each a 2-rank gloo world on the CPU (tests/_engine_worker.py), must end 2 fp32
SGD steps at the single process's weights. Under the sharding engines the student's head is
really sharded outside the forward (checked), so a loss that read it as a plain [V, D] tensor
would fail or train a shard.

One torchrun world per engine runs the 4 trainers (KDTrainer, TopKKDTrainer,
KDDistillationTrainer, fused_divergence_loss in a Trainer), so process and engine start-up are
paid once per engine. ZeRO-3 JIT-builds DeepSpeed's shm_comm extension once (~60 s) into a
stable folder (KDK_TORCH_EXTENSIONS_DIR, default ~/.cache/kdkernels/torch_extensions).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate>=1.1")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "zero3", "fsdp1", "fsdp2")
TRAINERS = ("kd", "topk", "trl", "fused")
TOL = 1e-5  # fp32: the engines reduce the same gradients in another order
WORLD_TIMEOUT_S = 600  # a hang fails; a world takes ~40 s here, plus ~60 s for the first build
EXTENSIONS = os.environ.get("KDK_TORCH_EXTENSIONS_DIR",
                            str(Path.home() / ".cache" / "kdkernels" / "torch_extensions"))
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HAVE_TRL = importlib.util.find_spec("trl") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    trainers = [t for t in TRAINERS if t != "trl" or HAVE_TRL]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": EXTENSIONS,
            "KDK_ENGINE_TRAINERS": ",".join(trainers), "TOKENIZERS_PARALLELISM": "false"}


_RESULTS: dict[str, dict] = {}


def _run(engine: str, tmp_path_factory) -> dict:
    """{trainer: full student state dict, or {"crash": traceback}} of one run (cached)."""
    if engine in _RESULTS:
        return _RESULTS[engine]
    out = tmp_path_factory.mktemp(engine) / "result.pt"
    worker = ["-m", "tests._engine_worker", engine, str(out)]
    if engine == "single":
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *worker]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=WORLD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {engine} run did not finish in {WORLD_TIMEOUT_S} s (a hang)")
    assert proc.returncode == 0 and out.exists(), \
        f"{engine} exited with {proc.returncode}:\n{proc.stdout[-4000:]}"
    _RESULTS[engine] = torch.load(out, weights_only=False)
    return _RESULTS[engine]


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_ends_at_the_single_process_weights(engine, trainer, tmp_path_factory):
    if engine == "zero3" and not HAVE_DEEPSPEED:
        pytest.skip("deepspeed is not importable (it is in the dev extra)")
    if trainer == "trl" and not HAVE_TRL:
        pytest.skip("trl is not importable (it is in the dev extra)")
    reference = _run("single", tmp_path_factory)[trainer]
    assert "crash" not in reference, reference["crash"]
    got = _run(engine, tmp_path_factory)
    assert "crash" not in got[trainer], f"{engine}/{trainer} crashed:\n{got[trainer]['crash']}"
    # The engine must really shard the head; DDP replicates it.
    assert got[f"{trainer}:sharded"] == (engine != "ddp")
    diffs = {k: (got[trainer][k] - v).abs().max().item() for k, v in reference.items()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{engine}/{trainer}: {worst} differs by {diffs[worst]:.3g}"


def test_the_reference_steps_move_every_trainer_s_weights(tmp_path_factory):
    """The comparison means something: 2 steps change the head and the embeddings; the
    untied trainers' heads are heads of their own."""
    from tests._engine_worker import UNTIED, models

    for trainer in TRAINERS:
        if trainer == "trl" and not HAVE_TRL:
            continue
        state = _run("single", tmp_path_factory)[trainer]
        assert "crash" not in state, state["crash"]
        start = dict(models(trainer)[0].named_parameters())
        assert ("lm_head.weight" in start) == (trainer in UNTIED)
        for name in ("lm_head.weight", "model.embed_tokens.weight"):
            if name in start:
                moved = (state[name] - start[name]).abs().max().item()
                assert moved > 1e-3, f"{trainer}: {name} moved {moved:.3g}"
