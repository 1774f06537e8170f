"""The backend table and `impl` dispatch.

Each entry is a module path exposing ``BACKEND`` (a base.Backend) or raising ImportError with
a reason. ``auto`` walks the device's preference list and takes the first backend that loads
and supports the input.
"""

from __future__ import annotations

import importlib

import torch

from .base import Backend, RowSpec

_MODULES: dict[str, str] = {
    "torch": "kdkernels.backends.torch_rows",
    "triton": "kdkernels.backends.triton_rows",
    "cpp": "kdkernels.backends.cpp_rows",
    "cuda": "kdkernels.backends.cuda_rows",
}
# Fastest first; bench/README.md has the measurements behind the order (on an H200 triton
# was as fast as or faster than cuda at every vocabulary, so it leads on CUDA).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}
_loaded: dict[str, Backend | str] = {}
_HIDDEN: set[str] = set()  # registered with listed=False


def load(name: str) -> Backend | str:
    """The backend, or a string saying why it cannot be loaded here."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            _loaded[name] = module.BACKEND
        except ImportError as err:  # missing toolkit, unbuilt extension, not written yet
            _loaded[name] = f"backend {name!r} is not available: {err}"
    return _loaded[name]


def register(name: str, module_path: str | None = None, *, backend: Backend | None = None,
             auto_on: dict[str, int] | None = None, listed: bool = True) -> None:
    """Add a backend to the table (out-of-tree backends, the benchmarks' null backend):
    a module path exposing ``BACKEND``, or the Backend itself. ``listed=False`` keeps it out
    of error messages and ``available()`` (a tool, not a choice for users)."""
    if (module_path is None) == (backend is None):
        raise ValueError("register needs exactly one of module_path and backend")
    _MODULES[name] = module_path or f"<registered {name}>"
    _loaded.pop(name, None)
    if backend is not None:
        _loaded[name] = backend
    if not listed:
        _HIDDEN.add(name)
    for device_type, position in (auto_on or {}).items():
        order = list(AUTO_ORDER.get(device_type, ()))
        order.insert(position, name)
        AUTO_ORDER[device_type] = tuple(order)


def reasons(name: str, device: torch.device, dtype: torch.dtype, spec: RowSpec,
            student_only: bool = False) -> list[str]:
    """Why backend ``name`` cannot serve this input (empty: it can). ``student_only``: the
    sparse-teacher losses, which need the student-only row ops."""
    backend = load(name)
    if isinstance(backend, str):
        return [backend]
    why = backend.not_supported_reasons(device, dtype, spec)
    if student_only and (backend.student_stats is None or backend.student_grad is None):
        why.append(f"backend {name!r} has no student-only row ops (sparse teachers)")
    return why


def select(impl: str, device: torch.device, dtype: torch.dtype, spec: RowSpec,
           student_only: bool = False) -> Backend:
    if impl not in _MODULES and impl != "auto":
        listed = [name for name in _MODULES if name not in _HIDDEN]
        raise ValueError(f"impl must be one of {', '.join(('auto', *listed))}; got {impl!r}")
    if impl != "auto":
        why = reasons(impl, device, dtype, spec, student_only)
        if why:
            raise ValueError(f"impl={impl!r} cannot serve this input: {'; '.join(why)}")
        return load(impl)  # type: ignore[return-value]
    tried = []
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        why = reasons(name, device, dtype, spec, student_only)
        if not why:
            return load(name)  # type: ignore[return-value]
        tried.append(f"{name}: {'; '.join(why)}")
    raise ValueError(f"impl='auto' found no backend for {device} {dtype}: {' | '.join(tried)}")


def available() -> dict[str, str]:
    """Backend name -> 'ok' or the reason it cannot load."""
    return {name: ("ok" if not isinstance(load(name), str) else load(name)) for name in _MODULES
            if name not in _HIDDEN}
