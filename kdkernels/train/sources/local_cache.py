"""Where the trainer keeps what it builds once and reuses across runs (tokenizers, token
streams, the embedded teacher): $KDKERNELS_CACHE or ~/.cache/kdkernels, keyed by content."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    return Path(os.environ.get("KDKERNELS_CACHE", Path.home() / ".cache" / "kdkernels"))


def content_key(obj: Any) -> str:
    """A short stable key of a JSON-able description (sorted keys: order-independent)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
