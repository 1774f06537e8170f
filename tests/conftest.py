"""Shared test setup: which backends run here, tolerances, and the Triton interpreter."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run on CPU tensors through its interpreter; it must be set before import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kdkernels.backends import registry  # noqa: E402

CPU = torch.device("cpu")


def cpu_impls() -> list[str]:
    """Backends that can serve fp32 CPU tensors in this environment."""
    from kdkernels.backends.base import RowSpec

    spec = RowSpec.build("forward_kl")
    return [name for name in ("torch", "cpp", "triton")
            if not registry.reasons(name, CPU, torch.float32, spec)]


def pytest_report_header(config):
    return f"kdkernels backends on CPU: {', '.join(cpu_impls())}; all: {registry.available()}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
