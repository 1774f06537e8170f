"""A user on a machine without a GPU sees no word about CUDA from importing the package,
running a loss, or the JIT build's import of torch.utils.cpp_extension (issue 23)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the rule is for CPU-only")

LOSS = """
import torch, kdkernels
h = torch.randn(5, 8, requires_grad=True); w = torch.randn(11, 8, requires_grad=True)
kdkernels.fused_linear_kd_loss(h, w, torch.randn(5, 8), torch.randn(11, 8)).backward()
kdkernels.kd_loss(torch.randn(5, 11, requires_grad=True), torch.randn(5, 11)).backward()
"""
BUILD_IMPORT = "from kdkernels.backends import extension; extension._cpp_extension()"


@pytest.mark.parametrize("code", [LOSS, BUILD_IMPORT], ids=["loss", "build_import"])
def test_no_cuda_warning_on_cpu(code):
    # CUDA_HOME set as on the build machines: torch warns "No CUDA runtime is found, using
    # CUDA_HOME=..." when cpp_extension is imported with it and no GPU.
    env = dict(os.environ, CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "CUDA" not in out.stderr, out.stderr


def test_the_probe_would_see_the_warning():
    """The unquieted import does warn here: the test above checks something real."""
    env = dict(os.environ, CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    out = subprocess.run([sys.executable, "-c", "from torch.utils import cpp_extension"],
                         capture_output=True, text=True, env=env, timeout=300)
    if torch.version.cuda is None:
        pytest.skip("a CPU build of torch does not warn")
    assert "No CUDA runtime is found" in out.stderr
