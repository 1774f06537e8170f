"""Tiny TRL set-ups shared by the TRL tests: a word-level tokenizer over the tiny models'
vocabulary (built in memory, nothing downloaded) and prompt datasets."""

from __future__ import annotations

from tests._train_helpers import VOCAB

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def tiny_tokenizer(padding_side: str = "left"):
    """A PreTrainedTokenizerFast whose VOCAB ids are <pad>, <eos>, <unk>, w3 ... w96."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS,
                                   unk_token=UNK, padding_side=padding_side)


def prompts(n: int, length: int = 4) -> list[dict[str, str]]:
    """Plain-text prompts of slightly different lengths (so left padding happens)."""
    return [{"prompt": " ".join(f"w{3 + (7 * i + 3 * j) % (VOCAB - 3)}"
                                for j in range(length + i % 2))} for i in range(n)]
