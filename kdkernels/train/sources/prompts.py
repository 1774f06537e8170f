"""--prompts FILE: a JSONL file of {"prompt": text} or {"messages": [...]} records, tokenized
once (chat messages through the tokenizer's chat template, generation prompt added)."""

from __future__ import annotations

import json
from pathlib import Path


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _chat_ids(tokenizer, messages: list, where: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--prompts {where} holds chat 'messages' but the tokenizer has no "
                         "chat template; give such records as {\"prompt\": text} instead")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return [int(t) for t in out]


def load(path: str, tokenizer) -> list[list[int]]:
    """Every record's token ids, in file order; an empty or malformed file raises naming
    --prompts and the line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {path!r} is not a file; pass a JSONL file of "
                         "{\"prompt\": ...} records")
    if tokenizer is None:
        raise ValueError("--prompts needs a tokenizer (the teacher's or the student's)")
    out: list[list[int]] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--prompts {where} is not JSON: {err}") from None
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            ids = _text_ids(tokenizer, rec["prompt"])
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            ids = _chat_ids(tokenizer, rec["messages"], where)
        else:
            raise ValueError(f"--prompts {where}: each record needs a string 'prompt' or a "
                             "list of chat 'messages'")
        if not ids:
            raise ValueError(f"--prompts {where}: the prompt tokenizes to no tokens")
        out.append(ids)
    if not out:
        raise ValueError(f"--prompts {path!r} holds no records")
    return out
