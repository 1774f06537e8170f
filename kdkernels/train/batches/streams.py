"""Token streams with a target mask: prompt/completion documents train on their completion
tokens only.

A document becomes prompt tokens + text tokens + EOS. ``targets[j]`` says whether token j is
trained on, i.e. whether the label that predicts it (at position j - 1) counts; the others
reach the loss as IGNORE_INDEX, so they add nothing to the loss, its gradient or num_items.
The EOS after a completion is a target (the student learns to stop). Windows are drawn at the
offsets windows.train_batch would use, so a stream without prompts gives the same batches as
the plain token tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data.documents import Document
from . import windows

IGNORE_INDEX = -100  # fused_linear_kd_loss's default ignore_index


@dataclass
class TokenStream:
    ids: torch.Tensor  # int64 [N]
    targets: torch.Tensor  # bool [N]

    def numel(self) -> int:
        return self.ids.numel()

    def trained(self) -> int:
        return int(self.targets.sum())

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "targets": self.targets}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> TokenStream:
        return cls(d["ids"], d["targets"])


def encode_texts(tokenizer, texts: list[str], eos_id: int) -> torch.Tensor:
    """All documents as one stream of token ids, an EOS after each."""
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int64)


def encode(tokenizer, docs: list[Document], eos_id: int) -> torch.Tensor | TokenStream:
    """A plain id tensor when no document has a prompt (what encode_texts gives), else a
    TokenStream whose prompt tokens are not targets."""
    if not any(d.prompt for d in docs):
        return encode_texts(tokenizer, [d.text for d in docs], eos_id)
    backend = tokenizer.backend_tokenizer
    # The prompt gets the tokenizer's special tokens (a BOS, if it adds one) and the
    # completion none, so that prompt + completion reads as one sequence.
    prompts = backend.encode_batch([d.prompt for d in docs])
    texts = backend.encode_batch([d.text for d in docs], add_special_tokens=False)
    ids: list[int] = []
    targets: list[bool] = []
    for p, t in zip(prompts, texts, strict=True):
        ids += p.ids + t.ids + [eos_id]
        targets += [False] * len(p.ids) + [True] * (len(t.ids) + 1)
    return TokenStream(torch.tensor(ids, dtype=torch.int64), torch.tensor(targets))


def labels_of(stream: TokenStream, starts: list[int], seq_len: int) -> torch.Tensor:
    """[B, seq_len - 1] labels of the windows at ``starts``: the next token, or IGNORE_INDEX
    where that token is not a target."""
    rows = []
    for s in starts:
        nxt = stream.ids[s + 1:s + seq_len]
        rows.append(torch.where(stream.targets[s + 1:s + seq_len], nxt,
                                torch.full_like(nxt, IGNORE_INDEX)))
    return torch.stack(rows)


def train_batch(stream: TokenStream, batch_size: int, seq_len: int, *, seed: int, step: int,
                micro: int = 0, rank: int = 0) -> dict[str, torch.Tensor]:
    """input_ids [B, S] and labels [B, S - 1], a function of the arguments only."""
    starts = windows.window_starts(stream.numel(), batch_size, seq_len, seed=seed, step=step,
                                  micro=micro, rank=rank)
    ids = torch.stack([stream.ids[s:s + seq_len] for s in starts])
    return {"input_ids": ids, "labels": labels_of(stream, starts, seq_len)}


def eval_batches(tokens: torch.Tensor | TokenStream, batch_size: int, seq_len: int,
                 n_batches: int) -> list:
    """windows.eval_batches for a plain stream; (input_ids, labels) pairs for a masked one,
    so held-out CE counts completion tokens only."""
    if isinstance(tokens, torch.Tensor):
        return windows.eval_batches(tokens, batch_size, seq_len, n_batches)
    starts = windows.eval_starts(tokens.numel(), batch_size, seq_len, n_batches)
    ids = torch.stack([tokens.ids[s:s + seq_len] for s in starts])
    labels = labels_of(tokens, starts, seq_len)
    if not bool((labels != IGNORE_INDEX).any()):
        raise ValueError("the held-out windows hold no completion tokens; use more held-out "
                         "data (--heldout-fraction) or a longer --seq-len")
    return list(zip(ids.split(batch_size), labels.split(batch_size), strict=True))
