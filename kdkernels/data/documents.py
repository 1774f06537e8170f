"""`--data` as documents: a text file, a folder of text files, JSONL records, a `datasets`
folder (save_to_disk) or a parquet file.

A document is (prompt, text): the trainer learns the text tokens and only reads the prompt
tokens (their labels are ignore_index). Plain text and `text` records have an empty prompt;
`prompt`/`completion` records put the completion in ``text``. One --data holds one kind of
document: mixing the two would silently change what the loss covers for some records, so it
is refused, and so is a folder mixing .jsonl, .parquet and text files.

Every refusal names the file and the line (JSONL) or row (datasets, parquet). Records whose
trained text is empty are skipped (datasets such as wikitext hold many empty rows); a source
with nothing left is refused.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT = "text"
PROMPT_COMPLETION = "prompt/completion"
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".js", ".html")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
EXTRA = "pip install 'kdkernels[data]' (or pip install datasets)"


@dataclass(frozen=True)
class Document:
    text: str  # trained on
    prompt: str = ""  # read as context, never trained on
    where: str = ""  # file (and line or row), relative to --data, for messages and hashing


@dataclass
class Documents:
    docs: list[Document]
    kind: str  # TEXT or PROMPT_COMPLETION
    source: str  # what was read, for the report
    skipped_empty: int = 0
    truncated: bool = False  # stopped at the byte budget (--corpus-max-mb)
    digest: str = ""  # sha256 of every document: the token cache's key
    first: str = ""  # where the first document came from (named when kinds are mixed)
    _hash: Any = field(default_factory=hashlib.sha256, repr=False)

    def add(self, doc: Document) -> None:
        self.docs.append(doc)
        self._hash.update(f"{doc.where}\0{doc.prompt}\0{doc.text}\0".encode())

    def chars(self) -> int:
        return sum(len(d.text) + len(d.prompt) for d in self.docs)


def read(path: str | Path, *, text_field: str = "text", max_mb: float = 0.0) -> Documents:
    """The documents of --data ``path`` (file order), at most ``max_mb`` million characters
    (0: no limit); refuses bad input naming the file and line."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"--data {str(path)!r} does not exist; pass a text file, a folder of "
                         "text files, a .jsonl file, a parquet file or a datasets folder")
    if root.is_dir() and any((root / m).exists() for m in DATASETS_MARKERS):
        files, reader, what = [root], _datasets_dir, f"datasets folder {root}"
    elif root.is_dir():
        files, reader = _folder_files(root)
        what = f"{root} ({len(files)} {_suffix_name(reader)} files)"
    else:
        files, reader, what = [root], _reader_for(root), str(root)
    out = Documents([], "", what)
    limit = max_mb * 1e6 if max_mb else float("inf")
    used = 0
    for kind, doc in _records(files, reader, root, text_field):
        if doc is None:
            out.skipped_empty += 1
            continue
        _check_kind(out, kind, doc, root)
        size = len(doc.text) + len(doc.prompt)
        if used and used + size > limit:
            out.truncated = True
            break
        used += size
        out.add(doc)
    if not out.docs:
        empty = f" ({out.skipped_empty} empty records skipped)" if out.skipped_empty else ""
        raise ValueError(f"--data {what} holds no text to train on{empty}")
    out.digest = out._hash.hexdigest()
    return out


def _records(files: list[Path], reader, root: Path,
             text_field: str) -> Iterator[tuple[str, Document | None]]:
    for file in files:
        where = file.name if file == root else str(file.relative_to(root))
        yield from reader(file, where, text_field)


def _check_kind(out: Documents, kind: str, doc: Document, root: Path) -> None:
    if not out.kind:
        out.kind, out.first, out.source = kind, doc.where, f"{out.source}, {kind} documents"
    elif kind != out.kind:
        raise ValueError(f"--data {root}: {doc.where} is a {kind} record but {out.first} is "
                         f"{out.kind}; one --data holds one kind of record (text, or prompt "
                         "and completion), so split them")


def _suffix_name(reader) -> str:
    return {_text_file: "text", _jsonl_file: "JSON Lines", _parquet_file: ".parquet"}[reader]


def _reader_for(file: Path):
    name = file.name.lower()
    # A single .json file is read as JSON Lines: a file of records is what --data means by
    # it (training on the raw JSON syntax would be a silent mistake). In a folder of text
    # files .json stays text, as in the embedded corpus's suffixes.
    if name.endswith(JSONL_SUFFIXES + (".json",)):
        return _jsonl_file
    if name.endswith(PARQUET_SUFFIXES):
        return _parquet_file
    return _text_file


def _folder_files(root: Path) -> tuple[list[Path], Any]:
    """The files of a folder (hidden entries skipped), all of one format."""
    groups: dict[Any, list[Path]] = {_text_file: [], _jsonl_file: [], _parquet_file: []}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            low = f.lower()
            if f.startswith("."):
                continue
            if low.endswith(JSONL_SUFFIXES):
                groups[_jsonl_file].append(Path(dirpath, f))
            elif low.endswith(PARQUET_SUFFIXES):
                groups[_parquet_file].append(Path(dirpath, f))
            elif low.endswith(TEXT_SUFFIXES):
                groups[_text_file].append(Path(dirpath, f))
    found = {reader: sorted(files) for reader, files in groups.items() if files}
    if not found:
        raise ValueError(f"--data {root} holds no text files ({', '.join(TEXT_SUFFIXES)}), "
                         ".jsonl or .parquet files")
    if len(found) > 1:
        examples = ", ".join(f"{files[0].relative_to(root)} ({_suffix_name(r)})"
                             for r, files in found.items())
        raise ValueError(f"--data {root} mixes file formats: {examples}; a folder holds one "
                         "format (text files, .jsonl or .parquet), so put the others elsewhere")
    (reader, files), = found.items()
    return files, reader


def _decode(file: Path) -> str:
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ValueError(f"--data: cannot read {file} ({err.strerror or err})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"--data: {file}, line {line}: not UTF-8 text (byte "
                         f"0x{raw[err.start]:02x} at offset {err.start})") from None


def _text_file(file: Path, where: str, text_field: str) -> Iterator[tuple[str, Document | None]]:
    text = _decode(file)
    if not text.strip():
        raise ValueError(f"--data: {file} is empty")
    yield TEXT, Document(text, "", where)


def _jsonl_file(file: Path, where: str, text_field: str) -> Iterator[tuple[str, Document | None]]:
    text = _decode(file)
    records = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            hint = (" (a single .json file is read as JSON Lines: one object per line)"
                    if file.suffix.lower() == ".json" else "")
            raise ValueError(f"--data: {file}, line {number}: invalid JSON ({err.msg}, column "
                             f"{err.colno}){hint}") from None
        records += 1
        yield record(obj, f"{where}:{number}", f"{file}, line {number}", text_field)
    if not records:
        raise ValueError(f"--data: {file} is empty (no JSON records)")


def record(obj: Any, where: str, place: str, text_field: str) -> tuple[str, Document | None]:
    """One JSONL record or table row as (kind, Document); None for an empty one."""
    if not isinstance(obj, dict):
        raise ValueError(f"--data: {place}: expected a JSON object with a {text_field!r} field "
                         f"(or 'prompt' and 'completion'); got {type(obj).__name__}")
    has_p, has_c = "prompt" in obj, "completion" in obj
    if has_p and has_c:
        prompt, completion = (_string(obj, k, place) for k in ("prompt", "completion"))
        return PROMPT_COMPLETION, Document(completion, prompt, where) if completion else None
    if text_field in obj:
        text = _string(obj, text_field, place)
        return TEXT, Document(text, "", where) if text.strip() else None
    keys = ", ".join(map(repr, list(obj)[:8])) or "none"
    half = (" ('prompt' without 'completion')" if has_p else
            " ('completion' without 'prompt')" if has_c else "")
    raise ValueError(f"--data: {place}: no {text_field!r} field{half} (fields: {keys}); "
                     "pass --text-field NAME for another text field, or give 'prompt' and "
                     "'completion'")


def _string(obj: dict, key: str, place: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"--data: {place}: field {key!r} must be a string; got "
                         f"{type(value).__name__}")
    return value


def _rows(table_rows: Iterable[dict], file: Path, where: str, text_field: str,
          what: str) -> Iterator[tuple[str, Document | None]]:
    n = -1
    for n, row in enumerate(table_rows):
        yield record(row, f"{where} row {n}", f"{file}, {what} row {n}", text_field)
    if n < 0:
        raise ValueError(f"--data: {file} is empty (no rows)")


def _columns(names: list[str], file: Path, text_field: str) -> list[str]:
    """The columns to read: the text field, or prompt and completion; refused otherwise."""
    if "prompt" in names and "completion" in names:
        return ["prompt", "completion"]
    if text_field in names:
        return [text_field]
    raise ValueError(f"--data: {file} has no {text_field!r} column (columns: "
                     f"{', '.join(names)}); pass --text-field NAME, or give 'prompt' and "
                     "'completion' columns")


def _optional(module: str, data: Path, what: str):
    """``module`` of the 'data' extra, or a refusal naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"--data {data} is {what}; reading it needs the optional 'data' "
                         f"extra: {EXTRA}") from None


def _open(opener: Callable[[], Any], data: Path, what: str):
    try:
        return opener()
    except Exception as err:  # ArrowInvalid, OSError, FileNotFoundError...: name the path
        raise ValueError(f"--data: {data} is not a readable {what} ({err})") from None


def _parquet_file(file: Path, where: str, text_field: str) -> Iterator[tuple[str, Document | None]]:
    pq = _optional("pyarrow.parquet", file, "a parquet file")
    pf = _open(lambda: pq.ParquetFile(str(file)), file, "parquet file")
    cols = _columns(pf.schema_arrow.names, file, text_field)

    def rows() -> Iterator[dict]:
        for batch in pf.iter_batches(columns=cols, batch_size=4096):
            yield from batch.to_pylist()

    yield from _rows(rows(), file, where, text_field, "parquet")


def _datasets_dir(root: Path, where: str, text_field: str) -> Iterator[tuple[str, Document | None]]:
    datasets = _optional("datasets", root, "a datasets folder (save_to_disk)")
    ds = _open(lambda: datasets.load_from_disk(str(root)), root, "datasets folder")
    split = ""
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if "train" in ds:
            split = "train"
        elif len(names) == 1:
            split = names[0]
        else:
            raise ValueError(f"--data {root} is a DatasetDict with splits {', '.join(names)} "
                             "and no 'train'; save the split to train on by itself")
        ds = ds[split]
    cols = _columns(list(ds.column_names), root, text_field)
    what = f"split {split!r}," if split else "dataset"
    yield from _rows(ds.select_columns(cols), root, where, text_field, what)
