"""A byte-level BPE trained locally with the `tokenizers` library (no download)."""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE with ``vocab_size`` entries, EOS included, as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + merges); got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, unk_token=None)


def load_or_train(cache_dir: Path, texts: list[str], vocab_size: int):
    """The tokenizer cached in ``cache_dir`` (keyed by the caller), else a fresh one."""
    from transformers import PreTrainedTokenizerFast

    if (cache_dir / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(cache_dir))
    tok = train_bpe(texts, vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(cache_dir))
    return tok

