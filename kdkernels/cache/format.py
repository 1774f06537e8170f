"""The on-disk format of a teacher cache: shard names, dtypes, the manifest, verification.

A cache is a directory of safetensors shards (``input_ids`` int32 [n, L], ``teacher_ids``
int32 [n, L, K], ``teacher_logprobs`` [n, L, K] in the cache dtype) and ``manifest.json``,
which lists only complete shards with their sha256. Everything here is pure format: the
writer and the dataset share it so that what one writes the other checks the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TMP_MARK = ".tmp"  # any name containing it is a writer's temporary file, never listed
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16,
                                  "fp32": torch.float32}
TENSORS = ("input_ids", "teacher_ids", "teacher_logprobs")
REQUIRED_KEYS = ("format_version", "teacher", "teacher_config_hash", "tokenizer_hash", "top_k",
                 "mode", "samples", "seed", "seq_len", "dtype", "num_sequences", "num_tokens",
                 "shards")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temporary file, fsync, atomic rename: readers see the old file or the new, never half."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(directory / MANIFEST,
                       (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest; a ValueError naming manifest.json if it is missing or malformed."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: missing; not a teacher cache (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: corrupt manifest ({err})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: corrupt manifest (a JSON object expected)")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path}: corrupt manifest (missing keys {', '.join(missing)})")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest['format_version']!r} is not "
                         f"supported (this kdkernels reads {FORMAT_VERSION})")
    if manifest["dtype"] not in DTYPES:
        raise ValueError(f"{path}: corrupt manifest (dtype {manifest['dtype']!r} not one of "
                         f"{', '.join(DTYPES)})")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and {"file", "sequences", "sha256"} <= set(s) for s in shards):
        raise ValueError(f"{path}: corrupt manifest (shards must be a list of "
                         "{file, sequences, sha256})")
    listed = sum(int(s["sequences"]) for s in shards)
    if listed != manifest["num_sequences"]:
        raise ValueError(f"{path}: corrupt manifest (shards hold {listed} sequences, "
                         f"num_sequences says {manifest['num_sequences']})")
    if manifest["num_tokens"] != listed * manifest["seq_len"]:
        raise ValueError(f"{path}: corrupt manifest (num_tokens {manifest['num_tokens']} != "
                         f"{listed} sequences x seq_len {manifest['seq_len']})")
    return manifest


def expected_shapes(manifest: dict[str, Any], n: int) -> dict[str, tuple[tuple[int, ...],
                                                                        torch.dtype]]:
    L, K = int(manifest["seq_len"]), int(manifest["top_k"])
    return {"input_ids": ((n, L), torch.int32), "teacher_ids": ((n, L, K), torch.int32),
            "teacher_logprobs": ((n, L, K), DTYPES[manifest["dtype"]])}


def check_shard_layout(path: Path, manifest: dict[str, Any], sequences: int) -> None:
    """Tensor names, shapes and dtypes of one shard against the manifest (header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(TENSORS):
                raise ValueError(f"{path.name}: tensors {sorted(names)}, expected "
                                 f"{list(TENSORS)}")
            for name, (shape, dtype) in expected_shapes(manifest, sequences).items():
                t = f.get_slice(name)
                got_shape, got_dtype = tuple(t.get_shape()), t.get_dtype()
                want_dtype = str(dtype).removeprefix("torch.")
                if got_shape != shape or _dtype_tag(got_dtype) != _dtype_tag(want_dtype):
                    raise ValueError(f"{path.name}: {name} is {got_dtype} {list(got_shape)}, "
                                     f"the manifest expects {want_dtype} {list(shape)}")
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path.name}: not a readable safetensors file ({err})") from None


_TAGS = {"I32": "int32", "BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _dtype_tag(name: str) -> str:
    return _TAGS.get(name, name)


def verify_shard(directory: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
    """A listed shard exists, has the listed sha256 and the manifest's layout."""
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise ValueError(f"{entry['file']}: listed in {MANIFEST} but missing from {directory}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ValueError(f"{entry['file']}: sha256 {digest} does not match the manifest's "
                         f"{entry['sha256']} (corrupt or modified shard)")
    check_shard_layout(path, manifest, int(entry["sequences"]))
