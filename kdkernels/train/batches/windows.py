"""The embedded corpus split by file, and deterministic token windows drawn from token
streams (--data goes through documents.py, split.py and user_data.py).

The embedded corpus is the Python standard library's own source, found through sysconfig,
so that every machine has the same real text offline. Batches are a pure function of
(seed, step, micro-batch, rank): resuming needs no data-loader state to be bit-for-bit.
"""

from __future__ import annotations

import os
import random
import sysconfig
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

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


def encode(tokenizer, texts: list[str], eos_id: int) -> torch.Tensor:
    """All documents as one stream of token ids, an EOS after each."""
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int64)


def _generator(*key: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


def train_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, *, seed: int, step: int,
                micro: int = 0, rank: int = 0) -> torch.Tensor:
    """[batch_size, seq_len] windows at random offsets, a function of its arguments only."""
    starts = window_starts(tokens.numel(), batch_size, seq_len, seed=seed, step=step,
                           micro=micro, rank=rank)
    return torch.stack([tokens[s:s + seq_len] for s in starts])


def window_starts(n_tokens: int, batch_size: int, seq_len: int, *, seed: int, step: int,
                  micro: int = 0, rank: int = 0) -> list[int]:
    """The offsets of train_batch's windows (shared by masked streams, see streams.py)."""
    if n_tokens <= seq_len:
        raise ValueError(f"the training split has {n_tokens} tokens, fewer than "
                         f"--seq-len {seq_len} + 1; use a larger corpus or a shorter --seq-len")
    g = _generator(seed, step, micro, rank)
    return torch.randint(0, n_tokens - seq_len, (batch_size,), generator=g).tolist()


def eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int,
                 n_batches: int) -> list[torch.Tensor]:
    """Fixed, evenly spread windows of the held-out split (the same for every model)."""
    starts = eval_starts(tokens.numel(), batch_size, seq_len, n_batches)
    windows = torch.stack([tokens[s:s + seq_len] for s in starts])
    return list(windows.split(batch_size))


def eval_starts(n_tokens: int, batch_size: int, seq_len: int, n_batches: int) -> list[int]:
    """The offsets of eval_batches' windows."""
    n_windows = min(batch_size * n_batches, n_tokens // seq_len)
    if n_windows < 1:
        raise ValueError(f"the held-out split has {n_tokens} tokens, fewer than "
                         f"--seq-len {seq_len}; use a larger corpus or a shorter --seq-len")
    stride = (n_tokens - seq_len) // max(n_windows - 1, 1)
    return [i * stride for i in range(n_windows)]
