"""Writing a cache shard by shard: atomic shards, a manifest of complete ones, resume.

Order of a shard's commit: the tensors go to a temporary file, fsync, os.replace to the
shard name, fsync of the directory, then the manifest (itself temp + fsync + rename) lists
it. A kill before the manifest write leaves an unlisted file, which the next open removes,
so the manifest never lists a shard that is not complete and a rerun never skips one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import format as fmt
from .hashing import teacher_hash, tokens_hash
from .validate import check_arrays, normalise

# meta keys that write_cache fills when absent (dtype: the log-probs' own, see
# write_cache); tokenizer_hash is required, as the cache is useless without it.
META_DEFAULTS: dict[str, Any] = {"teacher": None, "teacher_config_hash": None,
                                 "vocab_size": None, "mode": "topk", "samples": None,
                                 "seed": None, "dtype": "fp32", "data": None}
META_REQUIRED = ("tokenizer_hash",)
# How write_cache names the hashes of its tensors when a rerun finds other ones.
TENSOR_HASH_NAMES = {"data_hash": "input_ids (data_hash)",
                     "teacher_hash": "teacher_ids/teacher_logprobs (teacher_hash)"}
# settings that describe the run but may change between a run and its resume
INFORMATIONAL = ("data",)
# settings that follow from others: named only when nothing else explains the difference
DERIVED = ("data_hash", "expected_sequences")


_DTYPE_NAMES = {dtype: name for name, dtype in fmt.DTYPES.items()}


def _shown(cached: Any, now: Any, limit: int = 400) -> tuple[str, str]:
    """The two reprs of a refused setting: whole when short (paths, hashes); long ones cut
    from a little before their first difference, so that the two never read the same."""
    a, b = repr(cached), repr(now)
    if max(len(a), len(b)) <= limit:
        return a, b
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                 min(len(a), len(b)))
    start = max(0, first - limit // 4)

    def cut(text: str) -> str:
        return (("..." if start else "") + text[start:start + limit]
                + ("..." if start + limit < len(text) else ""))

    return cut(a), cut(b)


def _is_ours(name: str) -> bool:
    return name == fmt.MANIFEST or name.startswith("shard-") or fmt.TMP_MARK in name


class CacheWriter:
    """An open cache directory: new, or an existing one with the same settings to resume."""

    def __init__(self, directory: str | Path, settings: Mapping[str, Any], *,
                 option_names: Mapping[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.settings = {"format_version": fmt.FORMAT_VERSION, **settings}
        if self.settings["dtype"] not in fmt.DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(fmt.DTYPES)}; got "
                             f"{self.settings['dtype']!r}")
        self.dtype = fmt.DTYPES[self.settings["dtype"]]
        self._names = dict(option_names or {})
        self.manifest = self._open()

    # -- opening ----------------------------------------------------------------------------
    def _open(self) -> dict[str, Any]:
        d = self.directory
        if d.exists() and not d.is_dir():
            raise ValueError(f"{d} exists and is not a directory")
        d.mkdir(parents=True, exist_ok=True)
        if (d / fmt.MANIFEST).exists():
            manifest = fmt.read_manifest(d)
            self._check_same(manifest)
        else:
            others = sorted(p.name for p in d.iterdir() if not _is_ours(p.name))
            if others:
                raise ValueError(f"{d} holds files that are not a teacher cache "
                                 f"({', '.join(others[:3])}); choose an empty or new directory")
            manifest = {**self.settings, "num_sequences": 0, "num_tokens": 0, "shards": [],
                        "complete": False}
            fmt.write_manifest(d, manifest)
        listed = {s["file"] for s in manifest["shards"]}
        for p in d.iterdir():  # leftovers of a kill: temporary files, shards never listed
            if p.name != fmt.MANIFEST and _is_ours(p.name) and p.name not in listed:
                p.unlink()
        for s in manifest["shards"]:  # cheap check; TeacherCache(verify=True) hashes them
            p = d / s["file"]
            if not p.is_file() or ("bytes" in s and p.stat().st_size != s["bytes"]):
                raise ValueError(f"{s['file']}: listed in {d / fmt.MANIFEST} but missing or "
                                 "truncated; delete the cache directory and write it again")
        return manifest

    def _check_same(self, manifest: dict[str, Any]) -> None:
        diff = [k for k in self.settings
                if k not in INFORMATIONAL and manifest.get(k) != self.settings[k]]
        if any(k not in DERIVED for k in diff):  # e.g. a new --seq-len changes the data hash
            diff = [k for k in diff if k not in DERIVED]
        named = {self._names.get(k, k): k for k in reversed(diff)}  # one line per option
        diff = [k for k in diff if named[self._names.get(k, k)] == k]
        if diff:
            shown = {k: _shown(manifest.get(k), self.settings[k]) for k in diff}
            detail = "; ".join(f"{self._names.get(k, k)}: cache has {shown[k][0]}, now "
                               f"{shown[k][1]}" for k in diff)
            raise ValueError(f"{self.directory} holds a cache written with different options "
                             f"({detail}); rerun with the same options or choose another "
                             "output directory")

    # -- state ------------------------------------------------------------------------------
    @property
    def done_sequences(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def shard_bytes(self) -> int:
        return sum(int(s.get("bytes", 0)) for s in self.manifest["shards"])

    # -- writing ----------------------------------------------------------------------------
    def add_shard(self, input_ids: torch.Tensor, teacher_ids: torch.Tensor,
                  teacher_logprobs: torch.Tensor, *, checked: bool = False) -> dict[str, Any]:
        """Check, write and list one shard of sequences following the listed ones."""
        if self.complete:
            raise ValueError(f"{self.directory}: the cache is complete; no shard can be added")
        if not checked:
            check_arrays(input_ids, teacher_ids, teacher_logprobs, self.settings["vocab_size"])
        L, K = self.settings["seq_len"], self.settings["top_k"]
        if input_ids.shape[1] != L or teacher_ids.shape[2] != K:
            raise ValueError(f"shard has L={input_ids.shape[1]}, K={teacher_ids.shape[2]}; the "
                             f"cache has seq_len {L}, top_k {K}")
        ids, lp = normalise(teacher_ids, teacher_logprobs, self.dtype)
        tensors = {"input_ids": input_ids.to(torch.int32).contiguous(), "teacher_ids": ids,
                   "teacher_logprobs": lp}
        name = fmt.shard_name(len(self.manifest["shards"]))
        entry = self._commit(name, tensors)
        m = dict(self.manifest)
        m["shards"] = [*m["shards"], entry]
        m["num_sequences"] = m["num_sequences"] + entry["sequences"]
        m["num_tokens"] = m["num_sequences"] * L
        fmt.write_manifest(self.directory, m)
        self.manifest = m
        return entry

    def _commit(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        from safetensors.torch import save_file

        final = self.directory / name
        tmp = final.with_name(f"{name}{fmt.TMP_MARK}{os.getpid()}")
        save_file(tensors, str(tmp))
        os.chmod(tmp, 0o644)  # shards are data to share, not private temporaries
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        pause = float(os.environ.get("KDKERNELS_CACHE_TEST_PAUSE", "0") or 0)
        if pause:  # tests only: hold a written temporary shard so a kill lands mid-commit
            time.sleep(pause)
        digest = fmt.sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, final)
        fmt.fsync_dir(self.directory)
        return {"file": name, "sequences": int(tensors["input_ids"].shape[0]),
                "sha256": digest, "bytes": size}

    def finish(self) -> dict[str, Any]:
        """Mark the cache complete (nothing more will be added)."""
        if not self.complete:
            self.manifest = {**self.manifest, "complete": True}
            fmt.write_manifest(self.directory, self.manifest)
        return self.manifest


def settings_from_meta(meta: Mapping[str, Any], *, seq_len: int, top_k: int,
                       shard_size: int) -> dict[str, Any]:
    """The manifest's settings from a user's meta: required keys checked, defaults filled."""
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict; got {type(meta).__name__}")
    missing = [k for k in META_REQUIRED if meta.get(k) is None]
    if missing:
        raise ValueError(f"meta is missing required keys: {', '.join(missing)} (e.g. "
                         "kdkernels.cache.tokenizer_hash(tokenizer))")
    for key, actual in (("seq_len", seq_len), ("top_k", top_k)):
        if key in meta and meta[key] != actual:
            raise ValueError(f"meta[{key!r}] = {meta[key]!r} but the tensors have {actual}")
    settings = {**META_DEFAULTS, **dict(meta), "seq_len": seq_len, "top_k": top_k,
                "shard_size": shard_size}
    if settings["mode"] not in ("topk", "sample"):
        raise ValueError(f"meta['mode'] must be 'topk' or 'sample'; got "
                         f"{settings['mode']!r}")
    return settings


def write_cache(path: str | Path, input_ids: torch.Tensor, teacher_ids: torch.Tensor,
                teacher_logprobs: torch.Tensor, *, meta: Mapping[str, Any],
                shard_size: int = 1024) -> dict[str, Any]:
    """Write your own teacher outputs as a cache (the format of `kdk cache-teacher`).

    input_ids [n, L], teacher_ids [n, L, K] (negative = empty slot), teacher_logprobs
    [n, L, K] (natural-log probabilities at T = 1). ``meta`` needs ``tokenizer_hash``; see
    META_DEFAULTS for the rest (``dtype`` defaults to the log-probs' own: bf16, fp16, else
    fp32). Rerunning on the same directory with the same tensors resumes or is a no-op; other
    input ids or teacher targets raise, naming which. Returns the manifest.
    """
    check_arrays(input_ids, teacher_ids, teacher_logprobs, meta.get("vocab_size"))
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}")
    n, L, K = teacher_ids.shape
    if isinstance(meta, Mapping) and "dtype" not in meta:  # keep 16-bit log-probs 16-bit
        meta = {**meta, "dtype": _DTYPE_NAMES.get(teacher_logprobs.dtype, "fp32")}
    settings = settings_from_meta(meta, seq_len=L, top_k=K, shard_size=shard_size)
    settings.setdefault("data_hash", tokens_hash(input_ids))
    if settings["dtype"] in fmt.DTYPES:
        stored = normalise(teacher_ids, teacher_logprobs, fmt.DTYPES[settings["dtype"]])
        settings["teacher_hash"] = teacher_hash(*stored)
    settings["expected_sequences"] = n
    writer = CacheWriter(path, settings, option_names=TENSOR_HASH_NAMES)
    for start in range(writer.done_sequences, n, shard_size):
        sl = slice(start, min(start + shard_size, n))
        writer.add_shard(input_ids[sl], teacher_ids[sl], teacher_logprobs[sl], checked=True)
    return writer.finish()
