"""Whether the installed trl offers the trainer class one of our drop-ins subclasses, and if
not, a message naming the version found and the one needed."""

from __future__ import annotations

import importlib
import importlib.metadata

TRL_REQUIREMENT = "trl>=1.16,<2"


def trl_class_problem(ours: str, module: str, names: tuple[str, ...],
                      hooks: tuple[str, ...] = ()) -> str | None:
    """None if ``from module import *names`` works and ``names[0]`` has every one of ``hooks``
    (the methods ``ours`` overrides); otherwise why not."""
    need = f"{ours} needs {TRL_REQUIREMENT} (pip install 'kdkernels[trl]')"
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return f"trl is not installed; {need}"
    try:
        mod = importlib.import_module(module)
        base, *_ = (getattr(mod, name) for name in names)
    except Exception as err:  # an ImportError, or one of trl's dependencies failing
        return (f"trl {version} is installed but `from {module} import {', '.join(names)}` "
                f"fails ({type(err).__name__}: {err}); {need}")
    missing = [hook for hook in hooks if not hasattr(base, hook)]
    if missing:
        return (f"trl {version}'s {names[0]} has no {', '.join(missing)} (which {ours} "
                f"overrides); {need}")
    return None
