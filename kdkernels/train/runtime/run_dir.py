"""The run directory: one run per --output. A directory holding another run (or other
files) is refused unless --overwrite replaces it or --resume continues it with the same
configuration; run.json marks it with the run's fingerprint and command line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from ..config import saved_fingerprint
from . import checkpoint, distributed

RUN_MARKER = "run.json"


def prepare_output(out: Path, *, overwrite: bool, resume: bool, world: distributed.World,
                   fingerprint: dict[str, Any]) -> None:
    """Refuse to mix runs: an output dir holding another run needs --overwrite or --resume."""
    marker = out / RUN_MARKER
    if resume:
        if not marker.exists():
            raise ValueError(f"--resume: {out} holds no run ({RUN_MARKER} missing); pass the "
                             "--output of the run to continue")
        saved = saved_fingerprint(json.loads(marker.read_text())["fingerprint"], fingerprint)
        keys = set(saved) | set(fingerprint)
        diff = sorted(k for k in keys if saved.get(k) != fingerprint.get(k))
        if diff:
            detail = ", ".join(f"{k}: run {saved.get(k)!r} vs now {fingerprint.get(k)!r}"
                               for k in diff[:6])
            raise ValueError(f"--resume {out} was written by a different configuration "
                             f"({detail}); resume with the same options")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            what = "another kdk run" if marker.exists() else "other files"
            raise ValueError(f"--output {out} already holds {what}; pass --overwrite to "
                             "replace it, --resume to continue it, or another --output")
        if world.is_main:
            shutil.rmtree(out)
    world.barrier()
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(marker, {"fingerprint": fingerprint, "argv": sys.argv})
    world.barrier()
