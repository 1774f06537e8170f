"""Start a teacher server as a subprocess on loopback and wait until it answers: `kdk
serve-teacher` (its port from --port-file, so --port 0 works) or vLLM's OpenAI server run by the
python of its own venv. The tests and bench/served_teachers.py use these; so can a notebook."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    announced: str = ""  # kdk serve-teacher's "serving NAME on URL" line ('' for vLLM)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> int | None:
        """Terminate (kill after 20 s); the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(server: Server, timeout: float) -> None:
    """Poll /health until 200; fail with the server's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server at {server.url} not healthy after {timeout:.0f} s:\n"
                       f"{server.log_tail()}")


class KdkLaunch:
    """`kdk serve-teacher --teacher TEACHER --port 0 EXTRA...` started, not yet known to be up
    (start several, then ``ready()`` each): the port comes back in --port-file (next to
    ``log``)."""

    def __init__(self, teacher: str, log: Path, *extra: str):
        self.log = log
        self.port_file = log.with_suffix(".port")
        self.port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "kdkernels.cli", "serve-teacher", "--teacher", teacher,
               "--port", "0", "--port-file", str(self.port_file), *extra]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def ready(self, timeout: float = 300.0) -> Server:
        """The server once its port file is written and /health answers, with the line it
        announced itself with."""
        deadline = time.monotonic() + timeout
        while not self.port_file.exists() or not self.port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("kdk serve-teacher did not start:\n"
                                   f"{self.log.read_text()[-4000:]}")
            time.sleep(0.2)
        announced = next((line for line in self.log.read_text().splitlines()
                          if line.startswith("kdk serve-teacher: serving")), "")
        server = Server(self.proc, f"http://127.0.0.1:{int(self.port_file.read_text())}",
                        self.log, announced)
        wait_healthy(server, timeout)
        return server


def start_kdk(teacher: str, log: Path, *extra: str, timeout: float = 300.0) -> Server:
    """`kdk serve-teacher --teacher TEACHER --port 0 EXTRA...`, once it is up (``KdkLaunch``)."""
    return KdkLaunch(teacher, log, *extra).ready(timeout)


def start_vllm(python: str, model_dir: Path, log: Path, *, max_logprobs: int = 64,
               max_model_len: int = 64, timeout: float = 300.0) -> Server:
    """vLLM's OpenAI server (``python`` is its venv's) on the CPU, with the environment and
    flags it needs there (float32, eager, a 1 GiB KV cache, no usage stats, offline)."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--dtype", "float32", "--max-logprobs", str(max_logprobs),
           "--max-model-len", str(max_model_len), "--host", "127.0.0.1", "--port", str(port),
           "--enforce-eager"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            cwd=model_dir.parent)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    wait_healthy(server, timeout)
    return server
