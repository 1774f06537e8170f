"""TeacherCache: a verified, lazily read torch Dataset over a cache directory."""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from . import format as fmt


class TeacherCache(Dataset):
    """Sequence i of a cache as {"input_ids" [L], "teacher_ids" [L, K], "teacher_logprobs"
    [L, K]}. ``verify=True`` checks every listed shard's sha256 and layout on open; either
    way a missing shard or a bad layout raises a ValueError naming the file. Shards are read
    through safetensors' memory map, one sequence at a time, so the cache need not fit in RAM.
    """

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = fmt.read_manifest(self.path)
        self.seq_len = int(self.manifest["seq_len"])
        self.top_k = int(self.manifest["top_k"])
        self._starts: list[int] = []
        total = 0
        for entry in self.manifest["shards"]:
            if verify:
                fmt.verify_shard(self.path, entry, self.manifest)
            else:
                p = self.path / entry["file"]
                if not p.is_file():
                    raise ValueError(f"{entry['file']}: listed in {fmt.MANIFEST} but missing "
                                     f"from {self.path}")
                fmt.check_shard_layout(p, self.manifest, int(entry["sequences"]))
            self._starts.append(total)
            total += int(entry["sequences"])
        self._len = total
        self._handles: dict[int, Any] = {}

    @property
    def complete(self) -> bool:
        """False while a writer is still adding shards (or was killed before finishing)."""
        return bool(self.manifest.get("complete"))

    def __len__(self) -> int:
        return self._len

    def _handle(self, shard: int):
        from safetensors import safe_open

        h = self._handles.get(shard)
        if h is None:
            path = self.path / self.manifest["shards"][shard]["file"]
            h = self._handles[shard] = safe_open(str(path), framework="pt")
        return h

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"sequence {index} out of range for a cache of {self._len}")
        shard = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[shard]
        h = self._handle(shard)
        return {name: h.get_slice(name)[row] for name in fmt.TENSORS}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen their own handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
