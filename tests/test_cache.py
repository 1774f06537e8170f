"""The teacher-logit cache: exact top-k and seeded samples, kill/resume bit-identity,
verification of every shard, refusal of changed options, write_cache checks, the JSONL
converter. CPU, a tiny random Llama teacher, no downloads."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdkernels import cli
from kdkernels.cache import TeacherCache, read_manifest, tokenizer_hash, write_cache
from kdkernels.cache import format as fmt
from kdkernels.cache.scoring import Head, sample_rows, sequence_generator, topk_rows

ROOT = Path(__file__).resolve().parent.parent
L, SHARD = 32, 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama teacher (vocab 400, hidden 32, 2 layers) with a local BPE, and text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdkernels.train.sources.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("tiny")
    text = Path(argparse.__file__).read_text()[:12000]  # stdlib: the same text everywhere
    tok = train_bpe([text], 400)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    (root / "data.txt").write_text(text)
    return argparse.Namespace(root=root, teacher=root / "teacher", data=root / "data.txt",
                              model=model.eval(), tok=tok)


def _args(tiny, out, *extra):
    return ["cache-teacher", "--teacher", str(tiny.teacher), "--data", str(tiny.data),
            "--output", str(out), "--seq-len", str(L), "--shard-size", str(SHARD),
            "--no-progress", *extra]


def _run(tiny, out, *extra) -> int:
    return cli.main(_args(tiny, out, *extra))


def _tensors(path):
    ds = TeacherCache(path)
    return {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in fmt.TENSORS}


@pytest.fixture(scope="module")
def fp32_cache(tiny):
    out = tiny.root / "fp32"
    assert _run(tiny, out, "--dtype", "fp32", "--top-k", "16") == 0
    return out


def test_topk_equals_full_logits(tiny, fp32_cache):
    ds = TeacherCache(fp32_cache)
    m = ds.manifest
    assert m["num_sequences"] == len(ds) > SHARD and m["num_tokens"] == len(ds) * L
    assert m["vocab_size"] == len(tiny.tok) and m["tokenizer_hash"] == tokenizer_hash(tiny.tok)
    ids = torch.tensor(tiny.tok(tiny.data.read_text(), add_special_tokens=False)["input_ids"])
    assert len(ds) == ids.numel() // L
    for i in (0, len(ds) - 1):
        item = ds[i]
        assert torch.equal(item["input_ids"], ids[i * L:(i + 1) * L].to(torch.int32))
        assert item["teacher_ids"].shape == (L, 16) and item["teacher_logprobs"].dtype == \
            torch.float32
        with torch.no_grad():
            logits = tiny.model(item["input_ids"][None].long()).logits[0]
        v, k = torch.log_softmax(logits.float(), -1).topk(16, -1)
        assert torch.equal(item["teacher_ids"], k.to(torch.int32))
        torch.testing.assert_close(item["teacher_logprobs"], v, rtol=0, atol=2e-6)


def test_bf16_is_the_fp32_cache_rounded(tiny, fp32_cache):
    out = tiny.root / "bf16"
    assert _run(tiny, out, "--dtype", "bf16", "--top-k", "16") == 0
    a, b = _tensors(fp32_cache), _tensors(out)
    assert b["teacher_logprobs"].dtype == torch.bfloat16
    assert torch.equal(a["teacher_ids"], b["teacher_ids"])
    assert torch.equal(a["teacher_logprobs"].to(torch.bfloat16), b["teacher_logprobs"])


def test_head_chunks_bias_and_softcap():
    torch.manual_seed(1)
    w, b, h = torch.randn(300, 16), torch.randn(300), torch.randn(50, 16)
    head = Head(w, b, 3.0)
    ids, lps = topk_rows(head, h, 8, chunk_rows=7)  # chunks that do not divide the rows
    full = torch.log_softmax(3.0 * torch.tanh((h @ w.T + b) / 3.0), -1)
    v, k = full.topk(8, -1)
    assert torch.equal(ids, k.to(torch.int32))
    torch.testing.assert_close(lps, v, rtol=0, atol=1e-6)


def test_sample_rows_counts_seeded_and_truncated():
    torch.manual_seed(2)
    head = Head(torch.randn(50, 8) * 0.3, None, None)
    h = torch.randn(9, 8)
    ids, lps = sample_rows(head, h, 64, 64, sequence_generator(0, 3, torch.device("cpu")),
                           chunk_rows=4)
    again = sample_rows(head, h, 64, 64, sequence_generator(0, 3, torch.device("cpu")), 4)
    other = sample_rows(head, h, 64, 64, sequence_generator(1, 3, torch.device("cpu")), 4)
    assert torch.equal(ids, again[0]) and torch.equal(lps, again[1])
    assert not torch.equal(ids, other[0])
    # the same draws recounted by hand
    g = sequence_generator(0, 3, torch.device("cpu"))
    for s in range(0, 9, 4):
        probs = head.log_probs(h[s:s + 4]).exp()
        draws = torch.multinomial(probs, 64, replacement=True, generator=g)
        for r in range(draws.shape[0]):
            pairs = zip(ids[s + r].tolist(), lps[s + r].tolist(), strict=True)
            got = {i: lp for i, lp in pairs if i >= 0}
            want = {int(i): math.log(int(c) / 64) for i, c in
                    zip(*draws[r].unique(return_counts=True), strict=True)}
            assert got.keys() == want.keys()
            for i in got:
                assert got[i] == pytest.approx(want[i], abs=1e-6)
    valid = ids >= 0
    torch.testing.assert_close(torch.where(valid, lps.exp(), 0).sum(-1), torch.ones(9))
    assert (lps[~valid] == 0).all() and (~valid).any()  # empty slots: id -1, log-prob 0
    # fewer slots than distinct ids: the most frequent are kept, mass below 1
    ids4, lps4 = sample_rows(head, h, 4, 64, sequence_generator(0, 3, torch.device("cpu")), 4)
    assert torch.equal(ids4, ids[:, :4]) and torch.equal(lps4, lps[:, :4])


def test_sample_mode_cache(tiny):
    a, b = tiny.root / "sample-a", tiny.root / "sample-b"
    opts = ("--mode", "sample", "--samples", "32", "--top-k", "32", "--dtype", "fp32")
    assert _run(tiny, a, *opts, "--seed", "5") == 0
    assert _run(tiny, b, *opts, "--seed", "5", "--batch-size", "3") == 0
    ta, tb = _tensors(a), _tensors(b)
    for k in fmt.TENSORS:
        assert torch.equal(ta[k], tb[k]), k
    valid = ta["teacher_ids"] >= 0
    counts = torch.where(valid, ta["teacher_logprobs"].exp() * 32, 0)
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-4)
    torch.testing.assert_close(counts.sum(-1), torch.full(counts.shape[:2], 32.0))
    assert (ta["teacher_logprobs"][~valid] == 0).all()
    m = TeacherCache(a).manifest
    assert m["mode"] == "sample" and m["samples"] == 32 and m["seed"] == 5


def _shards(path):
    return [(s["file"], s["sequences"], s["sha256"]) for s in read_manifest(path)["shards"]]


def test_sigkill_mid_write_then_resume_is_bit_identical(tiny, fp32_cache):
    ref = tiny.root / "ref-bf16"
    assert _run(tiny, ref) == 0
    out = tiny.root / "killed"
    env = {**os.environ, "KDKERNELS_CACHE_TEST_PAUSE": "0.4"}
    cmd = [sys.executable, "-m", "kdkernels.cli", *_args(tiny, out)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # a shard listed and the next one half-committed
            listed = (out / fmt.MANIFEST).exists() and read_manifest(out)["shards"]
            if listed and any(fmt.TMP_MARK in p.name and p.name.startswith("shard-")
                              for p in out.iterdir()):
                break
            assert proc.poll() is None, "the writer finished before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("no shard appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(fmt.TMP_MARK in p.name for p in out.iterdir())  # the kill landed mid-write
    part = TeacherCache(out, verify=True)  # what the manifest lists opens and verifies
    assert not part.complete and 0 < len(part) < TeacherCache(ref).manifest["num_sequences"]
    assert _shards(out) == _shards(ref)[:len(_shards(out))]
    assert _run(tiny, out) == 0
    assert not any(fmt.TMP_MARK in p.name for p in out.iterdir())
    assert _shards(out) == _shards(ref)
    assert (out / fmt.MANIFEST).read_bytes() == (ref / fmt.MANIFEST).read_bytes()
    a, b = _tensors(out), _tensors(ref)
    for k in fmt.TENSORS:
        assert torch.equal(a[k], b[k]), k


def test_rerun_of_a_complete_cache_is_a_no_op(tiny, fp32_cache, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in fp32_cache.iterdir()}
    assert _run(tiny, fp32_cache, "--dtype", "fp32", "--top-k", "16") == 0
    assert "already complete" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in fp32_cache.iterdir()}


@pytest.mark.parametrize("extra,option", [
    (("--top-k", "8"), "--top-k"),
    (("--top-k", "16", "--seq-len", "16"), "--seq-len"),
    (("--top-k", "16", "--mode", "sample"), "--mode"),
])
def test_changed_options_are_refused(tiny, fp32_cache, capsys, extra, option):
    args = _args(tiny, fp32_cache)
    if "--seq-len" in extra:  # replace the default --seq-len of _args
        i = args.index("--seq-len")
        del args[i:i + 2]
    rc = cli.main([*args, "--dtype", "fp32", *extra])
    err = capsys.readouterr().err
    assert rc != 0 and option in err, err


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_top_k_above_the_vocabulary_is_refused_before_any_write(tiny, tmp_path, capsys, mode):
    out = tmp_path / "c"
    vocab = tiny.model.config.vocab_size
    assert _run(tiny, out, "--top-k", str(vocab + 1), "--mode", mode) == 2
    err = capsys.readouterr().err
    assert f"--top-k {vocab + 1}" in err and f"vocabulary ({vocab} tokens" in err, err
    assert not (out / fmt.MANIFEST).exists()  # no cache the loss would refuse, not even empty


def test_seed_and_samples_change_nothing_in_topk_mode(tiny, fp32_cache, capsys):
    """Top-k targets do not depend on --seed or --samples: a rerun with other values is the
    same cache (a no-op), and the manifest records neither."""
    m = read_manifest(fp32_cache)
    assert m["mode"] == "topk" and m["seed"] is None and m["samples"] is None
    for extra in (("--seed", "7"), ("--samples", "5"), ("--seed", "3", "--samples", "9")):
        assert _run(tiny, fp32_cache, "--dtype", "fp32", "--top-k", "16", *extra) == 0
        assert "already complete" in capsys.readouterr().out, extra
    assert read_manifest(fp32_cache) == m


def test_a_topk_cache_that_recorded_its_seed_still_resumes(tiny, fp32_cache, tmp_path, capsys):
    """Top-k caches written before recorded --seed (default 0): any --seed resumes them."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(fp32_cache, old)
    m = read_manifest(old)
    fmt.write_manifest(old, {**m, "seed": 0})
    assert _run(tiny, old, "--dtype", "fp32", "--top-k", "16", "--seed", "4") == 0
    assert "already complete" in capsys.readouterr().out


def test_seed_and_samples_are_refused_when_they_change_sampled_targets(tiny, tmp_path,
                                                                       capsys):
    out = tmp_path / "s"
    opts = ("--mode", "sample", "--samples", "8", "--top-k", "8", "--seed", "1")
    assert _run(tiny, out, *opts) == 0
    capsys.readouterr()
    for option, value in (("--seed", "2"), ("--samples", "16")):
        changed = list(opts)
        changed[changed.index(option) + 1] = value
        assert _run(tiny, out, *changed) == 2
        err = capsys.readouterr().err
        assert f"{option}: cache has" in err and "different options" in err, err
    assert _run(tiny, out, *opts) == 0  # the same options: already complete


def test_a_changed_teacher_path_shows_both_paths(tiny, tmp_path, capsys):
    """Two teacher directories whose paths differ only at the end (the same model): the
    refusal shows each path whole, so that the two can be told apart."""
    import shutil

    parent = tmp_path / ("a-rather-long-directory-name-for-the-teachers-of-this-project")
    one, two = parent / "teacher-checkpoint-one", parent / "teacher-checkpoint-two"
    shutil.copytree(tiny.teacher, one)
    shutil.copytree(tiny.teacher, two)
    out = tmp_path / "c"
    argv = ["cache-teacher", "--data", str(tiny.data), "--output", str(out), "--seq-len",
            str(L), "--top-k", "4", "--no-progress", "--teacher"]
    assert cli.main([*argv, str(one)]) == 0
    capsys.readouterr()
    assert cli.main([*argv, str(two)]) == 2
    err = capsys.readouterr().err
    assert f"--teacher: cache has {str(one.resolve())!r}, now {str(two.resolve())!r}" in err, err


def test_long_refused_values_are_cut_where_they_differ(tmp_path):
    from kdkernels.cache.writer import CacheWriter

    base = {"teacher": "x", "teacher_config_hash": None, "tokenizer_hash": "t", "top_k": 2,
            "mode": "topk", "samples": None, "seed": None, "seq_len": 4, "dtype": "fp32",
            "shard_size": 8}
    one, two = "/data/" + "deep/" * 100 + "model-one", "/data/" + "deep/" * 100 + "model-two"
    CacheWriter(tmp_path, {**base, "teacher": one})
    with pytest.raises(ValueError) as err:
        CacheWriter(tmp_path, {**base, "teacher": two})
    msg = str(err.value)
    assert "model-one'" in msg and "model-two'" in msg and len(msg) < 1200, msg


def test_flipped_byte_and_missing_shard_are_named(tiny, fp32_cache):
    bad = tiny.root / "corrupt"
    assert write_cache(bad, *(_tensors(fp32_cache)[k] for k in fmt.TENSORS),
                       meta={"tokenizer_hash": "t", "teacher": "x"}, shard_size=SHARD)
    shard = bad / fmt.shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=fmt.shard_name(1)):
        TeacherCache(bad, verify=True)
    TeacherCache(bad, verify=False)  # the header is intact: only the hash finds it
    shard.unlink()
    for verify in (True, False):
        with pytest.raises(ValueError, match=f"{fmt.shard_name(1)}.*missing"):
            TeacherCache(bad, verify=verify)
    (bad / fmt.MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json"):
        TeacherCache(bad)
    (bad / fmt.MANIFEST).unlink()
    with pytest.raises(ValueError, match="manifest.json"):
        TeacherCache(bad)


def test_wrong_layout_and_counts_are_named(tmp_path):
    from safetensors.torch import save_file

    ids = torch.zeros(3, 5, dtype=torch.int32)
    t_ids = torch.arange(2).expand(3, 5, 2).contiguous()
    t_lp = torch.full((3, 5, 2), -1.0)
    write_cache(tmp_path, ids, t_ids, t_lp, meta={"tokenizer_hash": "t", "teacher": "x"})
    m = json.loads((tmp_path / fmt.MANIFEST).read_text())
    name = m["shards"][0]["file"]
    save_file({"input_ids": ids, "teacher_ids": t_ids.int(),
               "teacher_logprobs": t_lp.half()}, str(tmp_path / name))  # fp16, not fp32
    m["shards"][0]["sha256"] = fmt.sha256_file(tmp_path / name)
    (tmp_path / fmt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"{name}: teacher_logprobs"):
        TeacherCache(tmp_path)
    m["num_sequences"] = 4
    (tmp_path / fmt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match="manifest.json.*num_sequences"):
        TeacherCache(tmp_path)


def test_write_cache_round_trip_and_resume(tmp_path):
    torch.manual_seed(3)
    n, Lx, K = 5, 6, 3
    ids = torch.randint(0, 50, (n, Lx))
    t_ids = torch.stack([torch.randperm(50)[:K] for _ in range(n * Lx)]).view(n, Lx, K)
    t_ids[0, 0, 2] = -7  # an empty slot, stored as -1 with log-prob 0
    t_lp = torch.log_softmax(torch.randn(n, Lx, K), -1)
    meta = {"tokenizer_hash": "abc", "teacher": "api-model", "dtype": "fp32", "vocab_size": 50}
    m = write_cache(tmp_path, ids, t_ids, t_lp, meta=meta, shard_size=2)
    assert [s["sequences"] for s in m["shards"]] == [2, 2, 1] and m["complete"]
    assert m["top_k"] == K and m["seq_len"] == Lx and m["mode"] == "topk"
    ds = TeacherCache(tmp_path)
    assert len(ds) == n and ds[4]["teacher_ids"].shape == (Lx, K)
    assert ds[0]["teacher_ids"][0, 2] == -1 and ds[0]["teacher_logprobs"][0, 2] == 0
    assert torch.equal(ds[3]["teacher_logprobs"], t_lp[3])
    assert write_cache(tmp_path, ids, t_ids, t_lp, meta=meta, shard_size=2) == m  # no-op
    with pytest.raises(ValueError, match="data_hash"):
        write_cache(tmp_path, ids.flip(0), t_ids, t_lp, meta=meta, shard_size=2)


@pytest.mark.parametrize("case,pattern", [
    ("shape", r"teacher_ids must be \[n, L, K\]"),
    ("lp_shape", "teacher_logprobs must have"),
    ("float_ids", "teacher_ids must be an integer"),
    ("range", r"teacher_ids out of range.*sequence 1, position 2"),
    ("input_range", r"input_ids out of range.*sequence 0, position 1"),
    ("nan", r"teacher_logprobs not finite.*sequence 1, position 0"),
    ("positive", r"teacher_logprobs must be log-probabilities.*sequence 0, position 3"),
    ("duplicate", r"teacher_ids repeats an id.*sequence 1, position 1"),
    ("meta", "meta is missing required keys: tokenizer_hash"),
])
def test_write_cache_rejects_bad_input(tmp_path, case, pattern):
    ids = torch.zeros(2, 4, dtype=torch.int64)
    t_ids = torch.tensor([0, 1, 2]).expand(2, 4, 3).clone()
    t_lp = torch.full((2, 4, 3), -2.0)
    meta = {"tokenizer_hash": "t", "teacher": "x", "vocab_size": 10}
    if case == "shape":
        t_ids = t_ids[:, :3]
    elif case == "lp_shape":
        t_lp = t_lp[..., :2]
    elif case == "float_ids":
        t_ids = t_ids.float()
    elif case == "range":
        t_ids[1, 2, 0] = 10
    elif case == "input_range":
        ids[0, 1] = 99
    elif case == "nan":
        t_lp[1, 0, 1] = float("nan")
    elif case == "positive":
        t_lp[0, 3, 2] = 0.5
    elif case == "duplicate":
        t_ids[1, 1, 2] = 0
    elif case == "meta":
        meta = {"teacher": "x"}
    with pytest.raises((ValueError, TypeError), match=pattern):
        write_cache(tmp_path / "c", ids, t_ids, t_lp, meta=meta)
    assert not (tmp_path / "c" / fmt.MANIFEST).exists()


def _small_targets(n=3, L=4, K=3, vocab=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, L), generator=gen)
    t_ids = torch.stack([torch.randperm(vocab, generator=gen)[:K] for _ in range(n * L)])
    t_lp = torch.log_softmax(torch.randn(n * L, vocab, generator=gen), -1).gather(1, t_ids)
    return ids, t_ids.view(n, L, K), t_lp.view(n, L, K)


def test_write_cache_refuses_more_slots_than_the_vocabulary(tmp_path):
    ids, t_ids, t_lp = _small_targets(K=3, vocab=3)
    t_ids = torch.cat([t_ids, torch.full_like(t_ids[..., :1], -1)], -1)  # K = V + 1
    t_lp = torch.cat([t_lp, torch.zeros_like(t_lp[..., :1])], -1)
    with pytest.raises(ValueError, match="K = 4 slots per position but vocab_size is 3"):
        write_cache(tmp_path / "c", ids, t_ids, t_lp,
                    meta={"tokenizer_hash": "t", "vocab_size": 3})
    assert not (tmp_path / "c" / fmt.MANIFEST).exists()


def test_write_cache_refuses_probabilities_above_one(tmp_path):
    ids, t_ids, _ = _small_targets()
    t_lp = torch.full(t_ids.shape, math.log(0.4))  # 3 x 0.4 = 1.2 per position
    with pytest.raises(ValueError, match=r"exp-sum to at most 1.*1\.2 at sequence 0, "
                                         r"position 0"):
        write_cache(tmp_path / "c", ids, t_ids, t_lp, meta={"tokenizer_hash": "t"})
    assert not (tmp_path / "c" / fmt.MANIFEST).exists()


def test_write_cache_rerun_with_other_teacher_targets_is_refused(tmp_path):
    ids, t_ids, t_lp = _small_targets()
    meta = {"tokenizer_hash": "t", "teacher": "x"}
    first = write_cache(tmp_path, ids, t_ids, t_lp, meta=meta)
    assert write_cache(tmp_path, ids, t_ids, t_lp, meta=meta) == first  # same: a no-op
    other_lp = torch.log_softmax(torch.randn(*t_lp.shape[:2], 10), -1)[..., :3]
    for other in ((t_ids, other_lp), (t_ids.roll(1, -1), t_lp)):
        with pytest.raises(ValueError, match="teacher_ids/teacher_logprobs"):
            write_cache(tmp_path, ids, *other, meta=meta)
    ds = TeacherCache(tmp_path)  # the old targets, untouched
    assert torch.equal(ds[1]["teacher_logprobs"], t_lp[1])


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bf16"), (torch.float16, "fp16"),
                                        (torch.float32, "fp32")])
def test_write_cache_keeps_the_logprob_dtype_without_meta_dtype(tmp_path, dtype, name):
    ids, t_ids, t_lp = _small_targets()
    m = write_cache(tmp_path, ids, t_ids, t_lp.to(dtype), meta={"tokenizer_hash": "t"})
    assert m["dtype"] == name
    got = TeacherCache(tmp_path)[0]["teacher_logprobs"]
    assert got.dtype == dtype and torch.equal(got, t_lp[0].to(dtype))


def test_write_cache_needs_no_teacher_name(tmp_path):
    ids, t_ids, t_lp = _small_targets()
    m = write_cache(tmp_path, ids, t_ids, t_lp, meta={"tokenizer_hash": "t"})
    assert m["teacher"] is None and m["complete"]
    assert len(TeacherCache(tmp_path)) == 3


def test_jsonl_converter_round_trip(tiny, tmp_path):
    import importlib.util

    path = ROOT / "examples" / "cache_from_logprobs.py"
    spec = importlib.util.spec_from_file_location("cache_from_logprobs", path)
    cfl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfl)
    tok = tiny.tok
    merges = [t for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if i > 300]
    vocab = [t for t in merges if tok.convert_tokens_to_string([t]).strip().isalpha()][:10]
    text = [tok.convert_tokens_to_string([t]) for t in vocab]  # decoded, as an API prints
    assert len(set(text)) == 10
    chat = {"choices": [{"logprobs": {"content": [
        {"token": text[j], "logprob": -0.5,  # a distribution: 0.61 + 0.22 + 0.08 <= 1
         "top_logprobs": [{"token": text[(j + d) % 10], "logprob": -0.5 - d} for d in range(3)]}
        for j in range(5)]}}]}
    legacy = {"choices": [{"logprobs": {"tokens": text[:5], "top_logprobs": [
        {text[(j + 1) % 10]: -0.5, text[(j + 2) % 10]: -1.5, text[j]: -9999.0}
        for j in range(5)]}}]}
    src = tmp_path / "resp.jsonl"
    src.write_text(json.dumps(chat) + "\n" + json.dumps(legacy) + "\n")
    out = tmp_path / "cache"
    assert cfl.main([str(src), "--tokenizer", str(tiny.teacher), "--output", str(out)]) == 0
    ds = TeacherCache(out)
    ids = tok.convert_tokens_to_ids(vocab)
    assert len(ds) == 2 and ds.manifest["top_k"] == 3 and ds.manifest["seq_len"] == 5
    assert ds[0]["input_ids"].tolist() == ids[:5]
    # position t holds entry t + 1; the last position is empty
    assert ds[0]["teacher_ids"][0].tolist() == [ids[1], ids[2], ids[3]]
    assert ds[0]["teacher_logprobs"][0].tolist() == pytest.approx([-0.5, -1.5, -2.5])
    assert (ds[0]["teacher_ids"][4] == -1).all()
    assert ds[1]["teacher_ids"][1].tolist() == [ids[3], ids[4], -1]  # -9999 dropped
    assert ds.manifest["tokenizer_hash"] == tokenizer_hash(tok)
    src.write_text(json.dumps({"logprobs": {"tokens": ["\u2603never-a-token"],
                                            "top_logprobs": [{}]}}) + "\n")
    with pytest.raises(ValueError, match="never-a-token.*not known to the tokenizer"):
        cfl.convert(src, tok)


def test_default_teacher_and_its_corpus(tmp_path, monkeypatch):
    """--teacher default: the embedded teacher (smoke preset here), trained then cached."""
    from kdkernels.train.cache_teacher import CacheOptions, cache_teacher
    from kdkernels.train.sources.cache_sources import default_teacher

    monkeypatch.setenv("KDKERNELS_CACHE", str(tmp_path / "kdk"))
    model, tok, ids = default_teacher("cpu", "smoke")
    assert ids.dim() == 1 and ids.max() < model.config.vocab_size == len(tok)
    m = cache_teacher(CacheOptions(teacher="default", output=str(tmp_path / "c"), seq_len=32,
                                   shard_size=4096, top_k=4, batch_size=64, progress=False,
                                   default_preset="smoke"))
    assert m["teacher"] == "default" and m["num_sequences"] == ids.numel() // 32
    assert m["tokenizer_hash"] == tokenizer_hash(tok) and m["complete"]
    assert torch.equal(TeacherCache(tmp_path / "c")[1]["input_ids"], ids[32:64].int())


def test_data_as_records_equals_the_same_texts_as_files(tiny, tmp_path):
    """--data as JSONL (--text-field), parquet, or a folder of .jsonl files tokenises the
    same texts, in the same order with EOS between them, as a folder of text files: the
    caches hold the same tokens and teacher targets."""
    text = tiny.data.read_text()
    parts = [text[:4000], text[4000:8000], text[8000:]]
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, part in enumerate(parts):
        (folder / f"{i}.txt").write_text(part)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": p, "id": i}) + "\n"
                             for i, p in enumerate(parts)))
    jfolder = tmp_path / "jsonl"
    jfolder.mkdir()
    for i, part in enumerate(parts):
        (jfolder / f"{i}.jsonl").write_text(json.dumps({"text": part}) + "\n")
    sources = [(folder, ()), (jsonl, ("--text-field", "body")), (jfolder, ())]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": parts}), tmp_path / "docs.parquet")
    sources.append((tmp_path / "docs.parquet", ()))
    got = []
    for i, (data, extra) in enumerate(sources):
        out = tmp_path / f"c{i}"
        argv = ["cache-teacher", "--teacher", str(tiny.teacher), "--data", str(data),
                "--output", str(out), "--seq-len", str(L), "--shard-size", str(SHARD),
                "--top-k", "4", "--no-progress", *extra]
        assert cli.main(argv) == 0
        got.append(_tensors(out))
    for other in got[1:]:
        for key in fmt.TENSORS:
            assert torch.equal(other[key], got[0][key]), key


def test_prompt_completion_records_and_a_wrong_field_are_refused(tiny, tmp_path, capsys):
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "def f(", "completion": "x): return x"}) + "\n")
    argv = ["cache-teacher", "--teacher", str(tiny.teacher), "--output", str(tmp_path / "o"),
            "--seq-len", str(L), "--no-progress", "--data"]
    assert cli.main([*argv, str(pc)]) == 2
    assert "prompt/completion records" in capsys.readouterr().err
    assert cli.main([*argv, str(pc), "--text-field", "body"]) == 2
    assert "body" in capsys.readouterr().err
