"""uld_loss on materialised logits against the package's own float64 oracle (uld/reference.py,
which shares no code with it), degenerate batches, reductions, the errors (each names its
argument), build_vocab_map and uld_inputs_from_text.

Tolerances (relative, max |ours - oracle| / max |oracle|): float64 1e-12 (the same math, other
summation orders); float32 logits 1e-5 against the oracle's float64 on the same values (float32
rounding of softmax, merge and sums: we see <= 2.2e-7 on the loss and <= 2e-6 on the
gradient, where the softmax gradients cancel; see test_uld_parity.py's docstring).
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdkernels
from kdkernels.uld import align_batch, build_vocab_map, uld_inputs_from_text, uld_loss
from kdkernels.uld.reference import uld_loss_reference

from ._uld_helpers import (
    COMPLETIONS,
    PROMPTS,
    VS,
    VT,
    logits,
    loss_inputs,
    one_thread,  # noqa: F401 (the fixture)
    rel_err,
    synthetic_batch,
    synthetic_logits,
    text_batch,
    tokenizers,
)

ROOT = Path(__file__).resolve().parent.parent
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
pytestmark = pytest.mark.usefixtures("one_thread")


def _both(zs, zt, args, **kw):
    ours = uld_loss(zs, zt, *args, **kw)
    ref = uld_loss_reference(zs, zt, *args, **kw)
    g = torch.autograd.grad(ours.sum(), zs)[0]
    g_ref = torch.autograd.grad(ref.sum(), zs)[0]
    return ours, ref, g, g_ref


# ---- the oracle ---------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("offsets", [True, False], ids=["bytes", "positional"])
@pytest.mark.parametrize("merge", ["observed", "bayesian"])
@pytest.mark.parametrize("hybrid", [None, "adaptive", "fixed"])
def test_oracle(hybrid, merge, offsets, reduction):
    batch = text_batch()
    args = loss_inputs(batch, offsets)
    kw = dict(merge=merge, reduction=reduction, student_temperature=1.4,
              teacher_temperature=0.8, skip_teacher_eos=merge == "observed")
    if hybrid:
        kw["vocab_map"] = batch["vocab_map"]
    if hybrid == "fixed":
        kw.update(matched_weight=0.3, unmatched_weight=0.9, beta=0.2)
    for dtype in (torch.float64, torch.float32):
        zs, zt = logits(batch, dtype, seed=1)
        ours, ref, g, g_ref = _both(zs, zt, args, **kw)
        assert ours.shape == ((zs.shape[0],) if reduction == "none" else ())
        assert ours.dtype == dtype
        assert rel_err(ours, ref) <= TOL[dtype], (dtype, ours, ref)
        assert rel_err(g, g_ref) <= TOL[dtype], dtype


def test_reductions_relate_and_ce_shares():
    """sum == none.sum(); mean == none.sum() / B without CE; CE's per-sample shares add up."""
    batch = text_batch()
    zs, zt = logits(batch, seed=2)
    args = loss_inputs(batch)
    kw = dict(vocab_map=batch["vocab_map"], ce_weight=0.4, distillation_weight=0.6)
    none = uld_loss(zs, zt, *args, reduction="none", **kw)
    total = uld_loss(zs, zt, *args, reduction="sum", **kw)
    assert torch.allclose(none.sum(), total, rtol=1e-12)
    kw["ce_weight"] = 0.0
    none = uld_loss(zs, zt, *args, reduction="none", **kw)
    mean = uld_loss(zs, zt, *args, reduction="mean", **kw)
    assert torch.allclose(none.sum() / none.numel(), mean, rtol=1e-12)
    ref = uld_loss_reference(zs, zt, *args, reduction="none", **kw)
    assert rel_err(none, ref) <= 1e-12


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), B=st.integers(1, 6),
       vs=st.sampled_from([2, 3, 7, 13, 31, 64]), vt=st.sampled_from([2, 5, 11, 29, 40]),
       merge=st.sampled_from(["observed", "bayesian"]), offsets=st.booleans(),
       hybrid=st.booleans(), beta=st.sampled_from([0.0, 0.5, 1.0, 0.1]),
       temps=st.tuples(st.sampled_from([0.5, 1.0, 2.5]), st.sampled_from([0.3, 1.0, 1.7])),
       skips=st.tuples(st.booleans(), st.booleans()),
       reduction=st.sampled_from(["mean", "sum", "none"]), ce=st.sampled_from([0.0, 0.5]))
def test_oracle_property(seed, B, vs, vt, merge, offsets, hybrid, beta, temps, skips,
                         reduction, ce):
    """Random segmentations, odd and prime lengths and vocabularies, random injective maps."""
    batch = synthetic_batch(seed, B, vs, vt)
    keys = ["student_labels", "teacher_labels", "student_input_ids", "teacher_input_ids"]
    args = tuple(batch[k] for k in keys)
    if offsets:
        args += (batch["student_offsets"], batch["teacher_offsets"])
    zs, zt = synthetic_logits(batch, vs, vt, seed)
    kw = dict(merge=merge, beta=beta, student_temperature=temps[0],
              teacher_temperature=temps[1], skip_student_eos=skips[0],
              skip_teacher_eos=skips[1], reduction=reduction, ce_weight=ce)
    if hybrid:
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(0, min(vs, vt) + 1, (1,), generator=g))
        vmap = torch.full((vt,), -1, dtype=torch.long)
        vmap[torch.randperm(vt, generator=g)[:n]] = torch.randperm(vs, generator=g)[:n]
        kw["vocab_map"] = vmap
    ours, ref, gr, g_ref = _both(zs, zt, args, **kw)
    assert torch.isfinite(ours).all() and torch.isfinite(gr).all()
    assert rel_err(ours, ref) <= 1e-12
    assert rel_err(gr, g_ref) <= 1e-12


# ---- degenerate batches -------------------------------------------------------------------
def _labels_off(batch, keep_eos: bool = False):
    out = dict(batch)
    for side in ("student", "teacher"):
        lab = batch[f"{side}_labels"].clone()
        if keep_eos:  # only the last labelled token (the EOS) stays labelled
            last = (lab != -100).long().cumsum(1).argmax(1)
            eos = lab.gather(1, last[:, None])
            lab[:] = -100
            lab.scatter_(1, last[:, None], eos)
        else:
            lab[:] = -100
        out[f"{side}_labels"] = lab
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["prompt_only", "eos_only"])
def test_empty_answers_give_zero_and_zero_grads(kind, reduction):
    batch = _labels_off(text_batch(), keep_eos=kind == "eos_only")
    for hybrid in (False, True):
        for merge in ("observed", "bayesian"):
            zs, zt = logits(batch, torch.float32)
            kw = dict(merge=merge, reduction=reduction,
                      vocab_map=batch["vocab_map"] if hybrid else None,
                      ce_weight=0.5 if kind == "prompt_only" else 0.0)
            loss = uld_loss(zs, zt, *loss_inputs(batch), **kw)
            loss.sum().backward()
            assert torch.isfinite(loss).all() and (loss == 0).all()
            assert zs.grad is not None and (zs.grad == 0).all()


def test_empty_completion_text_and_mixed_batch():
    """A sample whose completion is "" (only its EOS) adds 0 and still counts in the mean."""
    s, t = tokenizers()
    batch = uld_inputs_from_text(["Hi", "Hello 東京"], ["", " là 😀"], s, t,
                                 teacher_vocab_size=VT)
    zs, zt = logits(batch, seed=4)
    args = loss_inputs(batch)
    none = uld_loss(zs, zt, *args, reduction="none")
    assert none[0] == 0 and none[1] > 0
    mean = uld_loss(zs, zt, *args)
    assert torch.allclose(mean, none[1] / 2)
    (g,) = torch.autograd.grad(mean, zs)
    assert (g[0] == 0).all() and torch.isfinite(g).all()


def test_no_batch_and_one_position():
    zs = torch.randn(0, 3, 5, requires_grad=True)
    lab = torch.zeros(0, 3, dtype=torch.long)
    loss = uld_loss(zs, torch.randn(0, 4, 6), lab, lab.new_zeros(0, 4), lab, lab.new_zeros(0, 4))
    assert loss.item() == 0
    zs = torch.randn(2, 1, 5, requires_grad=True)
    lab = torch.tensor([[1], [2]])
    loss = uld_loss(zs, torch.randn(2, 1, 6), lab, lab, lab, lab, ce_weight=1.0,
                    skip_student_eos=False, skip_teacher_eos=False)
    assert torch.isfinite(loss) and loss > 0  # one positional group per sample, no CE token


def test_teacher_gets_no_gradient():
    batch = text_batch()
    zs, zt = logits(batch)
    zt.requires_grad_(True)
    uld_loss(zs, zt, *loss_inputs(batch), vocab_map=batch["vocab_map"]).backward()
    assert zt.grad is None and zs.grad is not None and zs.grad.abs().sum() > 0


def test_aligned_groups_layout():
    """The interface both losses consume: groups sorted by sample, counts per sample, every
    row and token index in range, scalars point at their own sample's groups."""
    batch = text_batch()
    B, Ls = batch["student_labels"].shape
    Lt = batch["teacher_labels"].shape[1]
    for merge in ("observed", "bayesian"):
        g = align_batch(*loss_inputs(batch), merge=merge)
        assert (g.sample.diff() >= 0).all()
        assert torch.equal(torch.bincount(g.sample, minlength=B), g.groups_per_sample)
        for side, L in ((g.student, Ls), (g.teacher, Lt)):
            assert side.base_rows.numel() == g.num_groups
            assert ((side.base_rows >= 0) & (side.base_rows < B * L)).all()
            assert torch.equal(side.base_rows // L, g.sample)
            assert torch.equal(side.scalar_rows // L, g.sample[side.scalar_group])
            before = side.scalar_rows < side.base_rows[side.scalar_group]
            assert before.all() if merge == "bayesian" else (~before).all()


# ---- errors name their argument ----------------------------------------------------------
def _ok():
    batch = text_batch()
    zs, zt = logits(batch, torch.float32)
    return zs, zt, list(loss_inputs(batch)), batch["vocab_map"]


ERRORS = [
    ("student_logits", lambda zs, zt, a, v: ((zs[0], zt, *a), {})),
    ("teacher_logits", lambda zs, zt, a, v: ((zs, zt.long(), *a), {})),
    ("student_labels", lambda zs, zt, a, v: ((zs[:, :-1], zt, *a), {})),
    ("teacher_labels", lambda zs, zt, a, v: ((zs, zt[:1], *a), {})),
    ("student_input_ids", lambda zs, zt, a, v: ((zs, zt, a[0], a[1], a[2][:, :-1], *a[3:]),
                                                 {})),
    ("teacher_offsets", lambda zs, zt, a, v: ((zs, zt, *a[:4], a[4]), {})),
    ("student_offsets", lambda zs, zt, a, v: ((zs, zt, *a[:4], a[4][..., :1], a[5]), {})),
    ("teacher_input_ids", lambda zs, zt, a, v: ((zs, zt, a[0], a[1], a[2], a[3] + VT, *a[4:]),
                                                 {})),
    ("vocab_map", lambda zs, zt, a, v: ((zs, zt, *a), {"vocab_map": v[:-1]})),
    ("vocab_map", lambda zs, zt, a, v: ((zs, zt, *a), {"vocab_map": v.clone().fill_(VS)})),
    ("vocab_map", lambda zs, zt, a, v: ((zs, zt, *a), {"vocab_map": v - 2})),
    ("vocab_map", lambda zs, zt, a, v: ((zs, zt, *a), {"vocab_map": v.float()})),
    ("merge", lambda zs, zt, a, v: ((zs, zt, *a), {"merge": "greedy"})),
    ("student_temperature", lambda zs, zt, a, v: ((zs, zt, *a), {"student_temperature": 0})),
    ("teacher_temperature", lambda zs, zt, a, v: ((zs, zt, *a), {"teacher_temperature": -1})),
    ("reduction", lambda zs, zt, a, v: ((zs, zt, *a), {"reduction": "batchmean"})),
    ("impl", lambda zs, zt, a, v: ((zs, zt, *a), {"impl": "triton"})),
    ("beta", lambda zs, zt, a, v: ((zs, zt, *a), {"beta": 1.5})),
    ("matched_weight", lambda zs, zt, a, v: ((zs, zt, *a), {"vocab_map": v,
                                                            "matched_weight": -0.1})),
    ("ce_weight", lambda zs, zt, a, v: ((zs, zt, *a), {"ce_weight": float("nan")})),
    ("skip_student_eos", lambda zs, zt, a, v: ((zs, zt, *a), {"skip_student_eos": 1})),
]


@pytest.mark.parametrize("name,build", ERRORS, ids=[f"{n}-{i}" for i, (n, _) in
                                                     enumerate(ERRORS)])
def test_errors_name_their_argument(name, build):
    zs, zt, a, v = _ok()
    args, kw = build(zs, zt, a, v)
    with pytest.raises((ValueError, TypeError), match=name):
        uld_loss(*args, **kw)


def test_impl_error_lists_the_choices():
    zs, zt, a, _ = _ok()
    with pytest.raises(ValueError, match="auto, torch"):
        uld_loss(zs, zt, *a, impl="cuda")
    uld_loss(zs, zt, *a, impl="torch")


def test_offsets_going_backwards_name_sample_and_position():
    zs, zt, a, _ = _ok()
    offs = a[4].clone()
    lab = a[0]
    pos = int((lab[1] != -100).nonzero()[2])
    offs[1, pos] = offs[1, pos - 1] - torch.tensor([0, 1])  # end before the previous end
    with pytest.raises(ValueError, match=f"student_offsets.*sample 1, position {pos}"):
        uld_loss(zs, zt, *a[:4], offs, a[5])
    offs = a[5].clone()
    offs[0, -1] = torch.tensor([5, 2])
    t_lab = a[1].clone()
    t_lab[0, -1] = 7
    with pytest.raises(ValueError, match="teacher_offsets"):
        uld_loss(zs, zt, a[0], t_lab, *a[2:5], offs, skip_teacher_eos=False)


def test_ce_labels_out_of_range_name_student_labels():
    zs, zt, a, _ = _ok()
    lab = a[0].clone()
    lab[0, -1] = VS
    ids = a[2].clone()
    with pytest.raises(ValueError, match="student_labels"):
        uld_loss(zs, zt, lab, a[1], ids, *a[3:], ce_weight=1.0)


# ---- vocab map and inputs from text --------------------------------------------------------
def test_build_vocab_map_is_golds_exact_string_match():
    s, t = tokenizers()
    vmap = build_vocab_map(s, t, teacher_vocab_size=VT)
    assert vmap.shape == (VT,) and vmap.dtype == torch.long
    sv, tv = s.get_vocab(), t.get_vocab()
    for string, tid in tv.items():
        assert vmap[tid] == sv.get(string, -1)
    assert (vmap[len(t):] == -1).all()
    assert build_vocab_map(s, t).shape == (len(t),)
    with pytest.raises(ValueError, match="teacher_vocab_size"):
        build_vocab_map(s, t, teacher_vocab_size=len(t) - 1)
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    import types

    cfg = types.SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=True, uld_skip_teacher_eos=True,
        use_extended_uld=True, uld_token_merge_strategy="observed", uld_use_hybrid_loss=True,
        uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    theirs = gold.ULDLoss(cfg, s, t).mapping_tensor
    assert torch.equal(vmap[: theirs.numel()], theirs)
    assert (vmap[theirs.numel():] == -1).all()


def _piece_bytes(tok, tid: int) -> bytes:
    from kdkernels.uld.text import _BYTE_OF

    return bytes(_BYTE_OF[c] for c in tok.convert_ids_to_tokens(tid))


def test_inputs_from_text_layout_and_byte_offsets():
    s, t = tokenizers()
    batch = text_batch()
    for side, tok in (("student", s), ("teacher", t)):
        ids, lab = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
        offs, mask = batch[f"{side}_offsets"], batch[f"{side}_attention_mask"]
        for b, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
            n = int(mask[b].sum())
            assert (mask[b, :n] == 1).all() and (mask[b, n:] == 0).all()
            kept = (lab[b] != -100).nonzero().squeeze(1)
            start = int(kept[0])
            assert kept.tolist() == list(range(start, n))  # completion + EOS, to the end
            assert torch.equal(lab[b, kept], ids[b, kept])
            assert tok.decode(ids[b, :start]) == prompt
            assert ids[b, n - 1] == tok.eos_token_id
            text = completion.encode("utf-8")
            assert offs[b, n - 1].tolist() == [len(text), len(text)]
            # each completion token's byte span holds exactly its piece's bytes
            pieces = b"".join(_piece_bytes(tok, int(i)) for i in ids[b, start:n - 1])
            assert pieces == text
            for k in range(start, n - 1):
                lo, hi = offs[b, k].tolist()
                assert text[lo:hi] == _piece_bytes(tok, int(ids[b, k]))
    assert batch["completion_bytes"].tolist() == [len(c.encode()) for c in COMPLETIONS]


def test_inputs_from_text_offsets_match_trls():
    """Our char -> byte conversion gives TRL's encode_with_byte_offsets, also for a tokenizer
    whose offsets trim whitespace (zero-width tokens) and for runs of spaces and newlines."""
    import copy

    from tokenizers import processors

    utils = pytest.importorskip("trl.experimental.utils")
    s, t = tokenizers()
    trimmed = copy.deepcopy(t)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    texts = COMPLETIONS + ["  Hello   wörld 😀 東京\n\n  naïve", "a  b", " é"]
    for side, tok in (("student", s), ("teacher", t), ("teacher", trimmed)):
        batch = uld_inputs_from_text([""] * len(texts), texts, s, tok, return_vocab_map=False)
        theirs = utils.encode_with_byte_offsets(tok.backend_tokenizer, texts)
        for b, (ids, offs) in enumerate(theirs):
            lab = batch[f"{side}_labels"][b]
            start = int((lab != -100).nonzero()[0])
            span = slice(start, start + len(ids))
            assert batch[f"{side}_input_ids"][b, span].tolist() == list(ids)
            assert [tuple(o) for o in batch[f"{side}_offsets"][b, span].tolist()] == offs


def test_inputs_from_text_chat_templates_and_truncation():
    import copy

    s, t = tokenizers()
    s, t = copy.deepcopy(s), copy.deepcopy(t)
    s.chat_template = ("{% for m in messages %}<s:{{ m['role'] }}>{{ m['content'] }}"
                       "{% endfor %}{% if add_generation_prompt %}<s:assistant>{% endif %}")
    t.chat_template = ("{% for m in messages %}[T {{ m['role'] }}] {{ m['content'] }}\n"
                       "{% endfor %}{% if add_generation_prompt %}[T assistant] {% endif %}")
    prompts, completions = ["é 東京?"], [" 😀 oui"]
    own = uld_inputs_from_text(prompts, completions, s, t, chat_template="own",
                               return_vocab_map=False)
    gold = uld_inputs_from_text(prompts, completions, s, t, chat_template="student",
                                return_vocab_map=False)
    assert "vocab_map" not in own

    def prompt_text(batch, side, tok):
        lab = batch[f"{side}_labels"][0]
        start = int((lab != -100).nonzero()[0])
        return tok.decode(batch[f"{side}_input_ids"][0, :start])

    assert prompt_text(own, "student", s) == "<s:user>é 東京?<s:assistant>"
    assert prompt_text(own, "teacher", t) == "[T user] é 東京?\n[T assistant] "
    assert prompt_text(gold, "teacher", t) == "<s:user>é 東京?<s:assistant>"
    assert torch.equal(own["student_input_ids"], gold["student_input_ids"])
    # max_length: the prompt goes first, the completion stays whole
    full = int(own["teacher_attention_mask"].sum())
    n_answer = int((own["teacher_labels"] != -100).sum())
    cut = uld_inputs_from_text(prompts, completions, s, t, chat_template="own",
                               max_length=n_answer + 2, return_vocab_map=False)
    assert cut["teacher_input_ids"].shape[1] == n_answer + 2 < full
    assert torch.equal(cut["teacher_input_ids"][0], own["teacher_input_ids"][0, -n_answer - 2:])
    with pytest.raises(ValueError, match="chat_template"):
        uld_inputs_from_text(prompts, completions, s, t, chat_template="teacher")
    plain_s, _ = tokenizers()
    with pytest.raises(ValueError, match="student_tokenizer"):
        uld_inputs_from_text(prompts, completions, plain_s, t, chat_template="own")
    with pytest.raises(ValueError, match="prompts"):
        uld_inputs_from_text(prompts * 2, completions, s, t)
    with pytest.raises(TypeError, match="prompts"):
        uld_inputs_from_text([[{"role": "user", "content": "x"}]], completions, s, t)


# ---- the package surface -----------------------------------------------------------------
def test_contract_signature():
    params = inspect.signature(kdkernels.uld_loss).parameters
    positional = ["student_logits", "teacher_logits", "student_labels", "teacher_labels",
                  "student_input_ids", "teacher_input_ids", "student_offsets",
                  "teacher_offsets"]
    keyword = dict(merge="observed", vocab_map=None, matched_weight=None,
                   unmatched_weight=None, beta=0.5, student_temperature=1.0,
                   teacher_temperature=1.0, skip_student_eos=True, skip_teacher_eos=True,
                   distillation_weight=1.0, ce_weight=0.0, ignore_index=-100,
                   reduction="mean", impl="auto")
    assert list(params) == positional + list(keyword)
    assert params["student_offsets"].default is None
    assert params["teacher_offsets"].default is None
    for name, default in keyword.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == default, name
    assert kdkernels.uld_loss is uld_loss
    assert "uld_loss" in kdkernels.__all__


def test_import_stays_light():
    code = ("import sys, kdkernels, kdkernels.uld\n"
            "heavy = [m for m in ('transformers', 'trl', 'tokenizers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_oracle_imports_neither_the_package_nor_trl():
    tree = ast.parse((ROOT / "kdkernels" / "uld" / "reference.py").read_text())
    for node in ast.walk(tree):
        names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, ast.dump(node)
        for name in names:
            assert not name.startswith(("kdkernels", "trl")), name
