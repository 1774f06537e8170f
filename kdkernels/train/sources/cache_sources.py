"""Where a cache's inputs come from: a Hugging Face teacher directory and text, or the
embedded default (the `kdk distill` teacher, tokenizer and corpus, trained if not cached)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

DEFAULT = "default"


def read_texts(path: str | Path) -> list[str]:
    """A text file, or every non-hidden file under a folder (sorted by relative path)."""
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = _visible_files(root)
    else:
        raise ValueError(f"--data {str(path)!r} does not exist; pass a text file or a folder")
    texts = []
    for p in files:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"--data: {p} is not UTF-8 text ({err})") from None
    if not texts:
        raise ValueError(f"--data {str(path)!r} holds no files")
    return texts


def _visible_files(root: Path) -> list[Path]:
    """Every file under root, hidden entries skipped, sorted by path."""
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def read_data(path: str | Path, text_field: str = "text") -> list[str]:
    """The texts of --data: records (a .jsonl/.json or .parquet file, a datasets save_to_disk
    folder, or a folder of only .jsonl or only .parquet files: the `kdk distill --data`
    reader, field ``text_field``), else a text file or a folder read whole (read_texts)."""
    from ...data import documents

    root = Path(path)
    if not _holds_records(root, documents):
        return read_texts(root)
    docs = documents.read(root, text_field=text_field)
    if docs.kind != documents.TEXT:
        raise ValueError(f"--data {docs.source}: a teacher cache stores every position of "
                         "the text and has no prompt mask, so prompt/completion records "
                         f"(first: {docs.first}) would be trained on their prompts; pass "
                         f"records with a {text_field!r} field")
    return [d.text for d in docs.docs]


def _holds_records(root: Path, documents) -> bool:
    records = documents.JSONL_SUFFIXES + (".json",) + documents.PARQUET_SUFFIXES
    if root.is_file():
        return root.name.lower().endswith(records)
    if not root.is_dir():
        return False
    if any((root / m).exists() for m in documents.DATASETS_MARKERS):
        return True
    names = [p.name.lower() for p in _visible_files(root)]
    return bool(names) and (all(n.endswith(documents.JSONL_SUFFIXES) for n in names)
                            or all(n.endswith(documents.PARQUET_SUFFIXES) for n in names))


def encode_texts(tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream: each text tokenised without added special tokens, the tokenizer's
    EOS (if it has one) between consecutive texts."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            ids.append(int(eos))
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.int64)


def load_teacher(path: str, device: torch.device):
    """A local Hugging Face causal LM and its tokenizer, the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise ValueError(f"--teacher {path!r} is not a directory; pass a local Hugging Face "
                         f"causal-LM directory or '{DEFAULT}'")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    return model, tok


def default_teacher(device: torch.device | str = "cpu", preset: str = "default"):
    """(teacher model, tokenizer, training-corpus token ids) of the embedded `kdk distill`
    default, from ~/.cache/kdkernels; the teacher is trained (and cached) if it is not."""
    from ..batches import windows
    from ..config import preset as make_preset
    from ..runtime import distributed
    from . import embedded_teacher, training_data

    cfg = make_preset(preset, device=str(device), progress=False)
    world = distributed.init(str(device))
    data = training_data.prepare(cfg, None, None, world)
    held = windows.eval_batches(data.held, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    with tempfile.TemporaryDirectory(prefix="kdk-teacher-") as out:  # training checkpoints
        teacher, _ = embedded_teacher.load_or_train(cfg, data, held, Path(out), world, "ddp")
    return teacher.eval(), data.tok, data.train
