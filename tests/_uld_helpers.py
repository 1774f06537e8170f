"""Shared set-up of the cross-tokenizer (ULD / GOLD hybrid) tests: two different byte-level BPE
tokenizers trained on the spot, multibyte texts, TRL's ULDLoss from a config namespace, and
synthetic aligned batches for the property tests."""

from __future__ import annotations

import functools
import random
import sysconfig
import types
from pathlib import Path

import pytest
import torch

VS, VT_TOKENIZER, VT = 300, 420, 424  # teacher logits wider than its tokenizer (padded rows)

# Accents, CJK, emoji (ZWJ sequences and flags too): the two tokenizers split them differently.
CORPUS_STUDENT = ("Café crème brûlée, naïve façade déjà vu. 東京は日本の首都です。"
                  " I ❤️ emoji 🎉🚀 and plain English words, the cat sat on the mat. ") * 20
CORPUS_TEACHER = ("Über schöne Städte: São Paulo, Zürich, Kraków. 北京和上海是中国的大城市。"
                  " 😀👍 words, more words; other text about the teacher's dog. ") * 20
PROMPTS = ["Question: où est le café?", "Translate 東京 please", "Say something 🎉", "Hi"]
COMPLETIONS = [" Café crème 🎉 naïve 北京!", "首都です。 São 😀 Zürich", " 👩‍👩‍👧 🇯🇵 ok", " the"]


@pytest.fixture(scope="module")
def one_thread():
    """The tensors here are tiny: one intra-op thread avoids contention on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def tokenizers():
    """(student, teacher): byte-level BPEs of 300 and 420 entries on different corpora."""
    from kdkernels.train.sources.tokenizer import train_bpe

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    student = train_bpe([CORPUS_STUDENT, (stdlib / "textwrap.py").read_text()], VS)
    teacher = train_bpe([CORPUS_TEACHER, (stdlib / "argparse.py").read_text()], VT_TOKENIZER)
    assert len(student) == VS and len(teacher) == VT_TOKENIZER
    return student, teacher


@functools.lru_cache(maxsize=4)
def text_batch(skip: int = 0):
    """uld_inputs_from_text on the multibyte prompts (the loss's inputs and vocab_map)."""
    from kdkernels.uld import uld_inputs_from_text

    s, t = tokenizers()
    n = len(PROMPTS) - skip
    return uld_inputs_from_text(PROMPTS[:n], COMPLETIONS[:n], s, t, teacher_vocab_size=VT)


def loss_inputs(batch, offsets: bool = True) -> tuple:
    keys = ["student_labels", "teacher_labels", "student_input_ids", "teacher_input_ids"]
    out = tuple(batch[k] for k in keys)
    if offsets:
        out += (batch["student_offsets"], batch["teacher_offsets"])
    return out


def logits(batch, dtype=torch.float64, seed: int = 0, scale: float = 2.0):
    """Random student / teacher logits for a text batch (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    B, Ls = batch["student_input_ids"].shape
    Lt = batch["teacher_input_ids"].shape[1]
    zs = torch.randn(B, Ls, VS, generator=g, dtype=torch.float64) * scale + 0.1
    zt = torch.randn(B, Lt, VT, generator=g, dtype=torch.float64) * scale - 0.1
    return zs.to(dtype).requires_grad_(True), zt.to(dtype)


def trl_uld(*, merge="observed", offsets=True, hybrid=False, matched_weight=None,
            unmatched_weight=None, beta=0.5, student_temperature=1.0, teacher_temperature=1.0,
            skip_student_eos=True, skip_teacher_eos=True, distillation_weight=1.0,
            ce_weight=0.0):
    """TRL 1.16's ULDLoss with the uld_* fields (a namespace, as GOLDConfig carries them)."""
    from trl.experimental.gold.gold_trainer import ULDLoss

    cfg = types.SimpleNamespace(
        uld_crossentropy_weight=ce_weight, uld_distillation_weight=distillation_weight,
        uld_student_temperature=student_temperature,
        uld_teacher_temperature=teacher_temperature, uld_skip_student_eos=skip_student_eos,
        uld_skip_teacher_eos=skip_teacher_eos, use_extended_uld=offsets,
        uld_token_merge_strategy=merge, uld_use_hybrid_loss=hybrid,
        uld_hybrid_matched_weight=matched_weight, uld_hybrid_unmatched_weight=unmatched_weight,
        beta=beta)
    s, t = tokenizers()
    return ULDLoss(cfg, s, t)


def ours_kwargs(case: dict, vocab_map) -> dict:
    """uld_loss keywords of a TRL case."""
    kw = {k: v for k, v in case.items() if k not in ("offsets", "hybrid")}
    if case.get("hybrid"):
        kw["vocab_map"] = vocab_map
    return kw


# The scale below which a reference is not its own measure: a gradient that cancels (a
# saturated sorted L1, p (1 - p) factors at sharp temperatures) ends at 1e-13..1e-9 while its
# float64 rounding stays ~1e-18 absolute (eps x the O(0.01) terms that cancel); measured
# against max(max |b|, 1e-5) that rounding passes at tol 1e-12 (an absolute 1e-17), and any
# wrong term (>= 1e-3 relative of gradients ~1e-2..1) still fails.
ZERO_SCALE = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max(max |b|, ZERO_SCALE)."""
    a, b = a.detach().double(), b.detach().double()
    scale = max(b.abs().max().item(), ZERO_SCALE)
    return (a - b).abs().max().item() / scale


def synthetic_batch(seed: int, B: int, vs: int, vt: int, *, max_bytes: int = 14,
                    prompt_max: int = 4, pad_max: int = 3, zero_width: bool = True) -> dict:
    """A batch whose two sides tokenize the same random byte strings differently: random cut
    points per side (sometimes a zero-width token), a prompt of 0..prompt_max tokens (0 makes
    the bayesian drop happen), an EOS at (n, n), right padding. Lengths come out odd, even,
    prime, whatever the draw gives."""
    rnd = random.Random(seed)

    def side(n_bytes: int, vocab: int):
        cuts = sorted(rnd.sample(range(1, n_bytes), rnd.randint(0, max(0, n_bytes - 1))))
        ends = cuts + [n_bytes] if n_bytes else []
        offs, start = [], 0
        for e in ends:
            offs.append((start, e))
            if zero_width and rnd.random() < 0.1:
                offs.append((e, e))
            start = e
        offs.append((n_bytes, n_bytes))  # EOS
        p = rnd.randint(0, prompt_max)
        ids = [rnd.randrange(vocab) for _ in range(p + len(offs))]
        labels = [-100] * p + ids[p:]
        return ids, labels, [(0, 0)] * p + offs

    rows = {"student": [], "teacher": []}
    for _ in range(B):
        n = rnd.randint(0, max_bytes)
        answer = rnd.random() > 0.1  # now and then a prompt-only sample
        for name, vocab in (("student", vs), ("teacher", vt)):
            ids, labels, offs = side(n, vocab)
            if not answer:
                labels = [-100] * len(labels)
            rows[name].append((ids, labels, offs))
    out = {}
    for name, r in rows.items():
        L = max(len(x[0]) for x in r) + rnd.randint(0, pad_max)
        ids = torch.zeros(B, L, dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        offs = torch.zeros(B, L, 2, dtype=torch.long)
        for b, (i, lab, o) in enumerate(r):
            ids[b, :len(i)] = torch.tensor(i)
            labels[b, :len(lab)] = torch.tensor(lab)
            offs[b, :len(o)] = torch.tensor(o)
        out.update({f"{name}_input_ids": ids, f"{name}_labels": labels,
                    f"{name}_offsets": offs})
    return out


def synthetic_logits(batch: dict, vs: int, vt: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B, Ls = batch["student_input_ids"].shape
    Lt = batch["teacher_input_ids"].shape[1]
    zs = torch.randn(B, Ls, vs, generator=g, dtype=torch.float64) * 3 + 0.05
    zt = torch.randn(B, Lt, vt, generator=g, dtype=torch.float64) * 3 - 0.05
    return zs.to(dtype).requires_grad_(True), zt.to(dtype)
