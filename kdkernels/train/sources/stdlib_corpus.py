"""The embedded corpus, split by file (--data goes through user_data.py instead).

It is the Python standard library's own source, found through sysconfig, so that every
machine has the same real text offline.
"""

from __future__ import annotations

import os
import random
import sysconfig
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
              "ensurepip", "__pycache__", "turtledemo"}
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".js", ".html")


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    source: str


def _files_under(root: Path, suffixes: Iterable[str]) -> list[Path]:
    suffixes = tuple(suffixes)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # prune, do not descend
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(suffixes))
    return sorted(found)


def _split(root: Path, files: list[Path], heldout_fraction: float, max_mb: float,
           source: str) -> Corpus:
    # A fixed shuffle, then a byte budget: a spread of modules, not the alphabet's start.
    files = list(files)
    random.Random(1234).shuffle(files)
    train, heldout, used = [], [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if max_mb and used + len(text) > max_mb * 1e6 and train and heldout:
            break
        used += len(text)
        # Split by file, decided by the path alone: stable across runs and machines.
        key = zlib.crc32(str(path.relative_to(root)).encode()) % 1000
        (heldout if key < heldout_fraction * 1000 else train).append(text)
    if not train or not heldout:
        raise ValueError(f"the corpus {source} is empty or too small to split: found "
                         f"{len(train)} training and {len(heldout)} held-out non-empty text "
                         f"files (suffixes {', '.join(TEXT_SUFFIXES)})")
    return Corpus(train, heldout, source)


def stdlib_corpus(max_mb: float = 6.0, heldout_fraction: float = 0.1) -> Corpus:
    """The standard library's .py sources (tests and vendored packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _split(root, _files_under(root, (".py",)), heldout_fraction, max_mb,
                  f"python-stdlib:{root}")
