"""`kdk`: the command line. `kdk distill` trains, `kdk info` lists backends and builds (the
benchmarks are scripts of a source checkout: bench/README.md). With no arguments,
`kdk distill` runs the embedded offline default."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from typing import Any

from . import divergences

# What each trainer command imports beyond the core install: the `[train]` extra.
_TRAIN_EXTRA = {"distill": ("transformers", "tokenizers", "matplotlib", "tqdm"),
                "cache-teacher": ("transformers", "tokenizers", "tqdm")}


def _missing_train_extra(command: str) -> str | None:
    """One line naming the missing packages and the extra that brings them, or None."""
    missing = [m for m in _TRAIN_EXTRA.get(command, ()) if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"kdk {command}: error: needs {', '.join(missing)} (not installed); install the "
            f"trainer's extra: pip install 'kdkernels[train]'")


def divergence_parameters() -> dict[str, list[str]]:
    """Each option a divergence of the table reads (its KDOptions field name) -> the
    divergences that read it, in table order: the flags --beta, --skew, ... come from here,
    so a new divergence parameter gets its flag with no edit."""
    readers: dict[str, list[str]] = {}
    for div in divergences.TABLE:
        for name in div.params:
            readers.setdefault(name, []).append(div.name)
    return readers


def _divergence_parameter_flags() -> list[tuple[str, dict[str, Any]]]:
    """(flag, add_argument keywords) of each divergence parameter, its default the
    trainer's (left unset here, so that presets and the config decide)."""
    from .train.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    flags = []
    for name, readers in divergence_parameters().items():
        default = f" [{defaults[name]}]" if name in defaults else ""
        plural = "s" if len(readers) > 1 else ""
        flags.append((f"--{name.replace('_', '-')}",
                      {"type": float, "help": f"{name} of the {', '.join(readers)} "
                                              f"divergence{plural}{default}"}))
    return flags


def _distill_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "distill", help="distil a teacher LM into a student with the fused KD loss",
        description="Distil a causal-LM teacher into a student with kdkernels' fused loss. "
        "With no --teacher, runs the embedded offline default: Python-stdlib corpus, local "
        "BPE, a small Llama teacher (cached under ~/.cache/kdkernels), then a student trained "
        "with dense KD, one from a top-K cache of the teacher, and one with CE only; the "
        "report goes to OUTPUT/report.md and report.png. With --teacher-cache, trains from a "
        "teacher-logit cache (kdk cache-teacher) with no teacher model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", default="default",
      choices=["default", "smoke", "on-policy", "on-policy-smoke", "cross-tokenizer",
               "cross-tokenizer-smoke"],
      help="option set for the embedded run; smoke finishes in under a minute; on-policy "
           "compares off-policy with on-policy KD (held-out CE and the teacher's NLL of each "
           "student's own samples), on-policy-smoke is its one-minute version; "
           "cross-tokenizer distils the embedded teacher into a student with its own BPE "
           "(another vocabulary size, trained on the spot) and compares CE-only, ULD and "
           "hybrid students in held-out bits per byte; cross-tokenizer-smoke is its "
           "one-minute version")
    a("--teacher", help="Hugging Face teacher (hub id or directory); default: embedded")
    a("--student", help="Hugging Face student to train (needs --teacher or --teacher-cache)")
    a("--data", help="a text file, a folder of text files, a .jsonl file of {'text': ...} "
                     "or {'prompt': ..., 'completion': ...} records (completions trained on "
                     "only), a parquet file or a datasets save_to_disk folder (parquet and "
                     "datasets need pip install 'kdkernels[data]'); default: the Python "
                     "standard library's sources")
    a("--text-field", help="the JSONL/parquet/datasets field holding the text [text]")
    a("--heldout-fraction", type=float,
      help="share of --data's documents held out (at least one; a single document's last "
           "part) [0.1]")
    a("--corpus-max-mb", type=float,
      help="read at most this many million characters of --data, in file order [preset: 6]")
    a("--teacher-dtype", choices=["fp32", "bf16", "fp16"],
      help="dtype the --teacher is loaded in; the student trains in fp32 [fp32]")
    a("--teacher-cache", metavar="DIR",
      help="train from this teacher-logit cache (kdk cache-teacher or write_cache) instead of "
           "a teacher: its sequences are the training tokens, its top-K log-probs the targets. "
           "The student is --student (its tokenizer must match the cache's tokenizer_hash) or, "
           "without it, the embedded default student. Held-out CE: --data's held-out files "
           "if given; else the embedded corpus's held-out files (embedded student); else the "
           "last 10%% of the cache's sequences (at least one), never trained on. --seq-len "
           "defaults to the cache's")
    g = p.add_argument_group("served teacher (a teacher in an inference server)")
    g.add_argument("--teacher-url", metavar="URL",
                   help="train from the teacher served at URL (kdk serve-teacher, vLLM or "
                        "SGLang) instead of a --teacher model: the student (--student, or the "
                        "embedded one) trains on --data (or the embedded corpus), each batch "
                        "labelled by the server, the next batch's request in flight while the "
                        "current one trains")
    g.add_argument("--teacher-server", choices=["vllm", "sglang", "kdk"],
                   help="the server's kind (its API) [kdk]")
    g.add_argument("--teacher-mode", choices=["topk", "hidden"],
                   help="topk: the server's top-K ids and log-probs, top-k loss (--tail); "
                        "hidden: its final hidden states and LM head, the exact dense loss "
                        "(--teacher-server kdk only) [topk]")
    g.add_argument("--top-k", type=int, help="K ids per position in topk mode [64]")
    g.add_argument("--teacher-api-key", metavar="KEY",
                   help="bearer token of a server started with --api-key")
    g.add_argument("--teacher-timeout", type=float, metavar="S",
                   help="seconds per request before the client retries it [60]")
    g.add_argument("--teacher-retries", type=int, metavar="N",
                   help="retries of a request that failed to connect, timed out or got a 5xx "
                        "(with backoff), before the run stops [3]")
    g = p.add_argument_group("loss")
    g.add_argument("--divergence", choices=[d.name for d in divergences.TABLE],
                   help="KD divergence [forward_kl]")
    for flag, options in _divergence_parameter_flags():
        g.add_argument(flag, **options)
    g.add_argument("--tail", choices=["bucket", "renormalize", "zero"],
                   help="top-k students: the teacher's mass outside its K ids as one extra "
                        "outcome (bucket), dropped with both sides renormalised over the K "
                        "(renormalize), or the K values as given (zero: for --mode sample "
                        "caches) [bucket]")
    g.add_argument("--temperature", type=float, help="softmax temperature T [preset]")
    g.add_argument("--kd-weight", type=float, help="weight of T^2 * divergence [preset]")
    g.add_argument("--ce-weight", type=float, help="weight of the hard-label CE [preset]")
    g.add_argument("--baseline", choices=["fused", "naive"],
                   help="naive: also train with a plain materialised-logits KD loss and "
                        "compare memory, speed and losses")
    g.add_argument("--impl", help="kdkernels backend (auto, torch, cpp, triton, cuda)")
    g.add_argument("--cross-tokenizer", choices=["uld", "hybrid"],
                   help="teacher and student with different tokenizers: uld (sorted-L1 "
                        "Universal Logit Distillation) or hybrid (GOLD: generalized JSD with "
                        "--beta on the token strings both vocabularies share, sorted L1 on the "
                        "rest). Default: hybrid when the vocabularies overlap by more than "
                        "half, overlap = teacher tokens whose string is also a student token / "
                        "the teacher's vocabulary (exact string match), else uld. "
                        "--temperature sets both sides', --kd-weight / --ce-weight weigh it "
                        "and the student's CE; held-out quality is in bits per byte. Refused "
                        "when the two share one tokenizer (the exact KD loss runs)")
    g.add_argument("--merge", choices=["observed", "bayesian"],
                   help="cross-tokenizer runs: the distribution of a text span that one side "
                        "splits into several tokens: the first token's row times the others' "
                        "probabilities (observed), or the last one's, from logits one position "
                        "earlier (bayesian) [observed]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, help="optimizer steps per student [preset]")
    g.add_argument("--lr", type=float, help="peak learning rate [preset]")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up, then cosine [preset]")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch [preset]")
    g.add_argument("--seq-len", type=int, help="tokens per sequence [preset]")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step, normalised with "
                                                  "num_items over all of them [1]")
    g.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... [cpu]")
    g.add_argument("--threads", type=int,
                   help="CPU threads per rank; 0 = every available core, less those other "
                        "processes keep busy over 1.5 s at start [0]. "
                        "Fix it for bit-for-bit resumes: CPU sums depend on the thread count")
    g.add_argument("--seed", type=int, help="student seed (init and batches) [0]")
    g.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="data parallelism under torchrun (gloo on CPU, NCCL on GPU)")
    g = p.add_argument_group("on-policy and sequence-level KD (teacher-distilled students)")
    g.add_argument("--on-policy", type=float, metavar="LAMBDA",
                   help="probability (seeded) that a micro-batch is replaced by the student's "
                        "own sampled completions of its prompts (GKD's lambda); the loss "
                        "covers the completion tokens only [0]")
    g.add_argument("--seq-kd", action="store_true", default=None,
                   help="the teacher generates the completions (sequence-level KD): every "
                        "micro-batch, or with --on-policy LAMBDA the ones the student does "
                        "not (TRL GKD's seq_kd)")
    g.add_argument("--prompt-len", type=int,
                   help="prompt tokens: the start of each training window, or the last ones "
                        "of a --prompts record [half of --seq-len]")
    g.add_argument("--prompts", metavar="FILE",
                   help="JSONL of {\"prompt\": text} or {\"messages\": [...]} records "
                        "(chat template applied) to draw prompts from instead of the data")
    g.add_argument("--max-new-tokens", type=int,
                   help="tokens generated per prompt [--seq-len minus --prompt-len]")
    g.add_argument("--gen-temperature", type=float, help="sampling temperature [1.0]")
    g.add_argument("--gen-top-p", type=float, help="nucleus sampling top-p, in (0, 1] [1.0]")
    g = p.add_argument_group("embedded models")
    g.add_argument("--teacher-steps", type=int, help="teacher training steps [preset]")
    g.add_argument("--vocab-size", type=int, help="BPE vocabulary size [preset]")
    g.add_argument("--cache-top-k", type=int,
                   help="K of the embedded default's teacher cache and top-k student; 0 = no "
                        "top-k student [preset: 64 default, 0 smoke]")
    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", default="kdk-run", help="output directory")
    g.add_argument("--overwrite", action="store_true", help="replace a previous run in OUTPUT")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in OUTPUT from its latest checkpoints")
    g.add_argument("--eval-every", type=int, help="held-out evaluation interval [preset]")
    g.add_argument("--save-every", type=int, help="checkpoint interval, 0 = at the end only")
    g.add_argument("--no-compare-ce", action="store_true",
                   help="skip the CE-only student (the embedded default trains it)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def _config(args: argparse.Namespace):
    from .train.config import TrainConfig, preset

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    overrides["progress"] = not args.no_progress
    return preset(args.preset, **overrides)


def _distill(args: argparse.Namespace) -> int:
    from .train import pipeline

    cfg = _config(args)
    served = _served_teacher(args)
    if args.preset.startswith("cross-tokenizer"):
        from .train import cross_tokenizer_preset

        _embedded_only(args)
        results = cross_tokenizer_preset.run(cfg, overwrite=args.overwrite,
                                             resume=args.resume, preset=args.preset)
        return 130 if any(r.get("interrupted") for r in results.values()) else 0
    if args.preset.startswith("on-policy"):
        from .train.on_policy import preset as on_policy_preset

        given = [o for o, v in (("--teacher", args.teacher), ("--student", args.student),
                                ("--data", args.data), ("--teacher-cache", args.teacher_cache),
                                ("--teacher-url", args.teacher_url))
                 if v]
        if given:
            raise ValueError(f"--preset {args.preset} runs on the embedded models and corpus; "
                             f"drop {', '.join(given)}")
        results = on_policy_preset.run(cfg, overwrite=args.overwrite, resume=args.resume,
                                       preset=args.preset)
        return 130 if any(r.get("interrupted") for r in results.values()) else 0
    if args.teacher_cache and args.seq_len is None and served is None:  # the cache's windows
        from .train.sources import teacher_cache

        cfg.seq_len = teacher_cache.seq_len(args.teacher_cache)
    results = pipeline.run(cfg, teacher_path=args.teacher, student_path=args.student,
                           data=args.data, teacher_cache=args.teacher_cache,
                           overwrite=args.overwrite, resume=args.resume,
                           parallel=args.parallel,
                           compare_ce=False if args.no_compare_ce else None, preset=args.preset,
                           served=served)
    return 130 if any(r.get("interrupted") for r in results.values()) else 0


def _embedded_only(args: argparse.Namespace) -> None:
    given = [o for o, v in (("--teacher", args.teacher), ("--student", args.student),
                            ("--data", args.data), ("--teacher-cache", args.teacher_cache),
                            ("--teacher-url", args.teacher_url)) if v]
    if given:
        raise ValueError(f"--preset {args.preset} runs on the embedded models and corpus; "
                         f"drop {', '.join(given)}")


def _served_teacher(args: argparse.Namespace):
    """The --teacher-url options (kdkernels.train.sources.served_teacher.ServedTeacher), or
    None; the other served-teacher flags are refused without --teacher-url."""
    flags = {"--teacher-server": args.teacher_server, "--teacher-mode": args.teacher_mode,
             "--top-k": args.top_k, "--teacher-api-key": args.teacher_api_key,
             "--teacher-timeout": args.teacher_timeout,
             "--teacher-retries": args.teacher_retries}
    if args.teacher_url is None:
        given = [f for f, v in flags.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} configure a served teacher: pass "
                             "--teacher-url URL too")
        return None
    from .train.sources.served_teacher import ServedTeacher

    given = {k: v for k, v in (("server", args.teacher_server), ("mode", args.teacher_mode),
                               ("top_k", args.top_k), ("api_key", args.teacher_api_key),
                               ("timeout", args.teacher_timeout),
                               ("retries", args.teacher_retries)) if v is not None}
    return ServedTeacher(args.teacher_url, **given)


def _cache_teacher_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "cache-teacher", help="write a teacher's top-K or sampled log-probs as a cache",
        description="Run a causal-LM teacher over text and store, per position, its top-K "
        "(or sampled) token ids and log-probs in verified safetensors shards with a "
        "manifest. Resumable: rerun the same command after an interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--teacher",
      help="local Hugging Face causal-LM directory, or 'default' for the embedded teacher "
      "(or --teacher-url: a served teacher)")
    a("--data", help="text file or folder of them, or text records: a .jsonl, .parquet or "
      "datasets save_to_disk folder, as for kdk distill (optional with --teacher default: "
      "its corpus)")
    a("--text-field", default="text", help="the records' text field (JSONL, parquet, datasets)")
    a("--output", "-o", required=True, help="cache directory")
    a("--top-k", type=int, default=64,
      help="K slots per position (at most the teacher's vocabulary size)")
    a("--mode", choices=["topk", "sample"], default="topk",
      help="topk: the K most likely ids; sample: distinct ids of --samples seeded draws")
    a("--samples", type=int, default=64,
      help="draws per position in sample mode (top-k mode ignores it)")
    a("--seq-len", type=int,
      help="tokens per sequence [512; with --generate: the longest prompt + N]")
    a("--shard-size", type=int, default=1024, help="sequences per shard")
    a("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="log-prob dtype")
    a("--batch-size", type=int, default=8,
      help="sequences per teacher forward (--teacher-url: per call to the server; with "
      "--generate: prompts in flight)")
    a("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    a("--seed", type=int, default=0, help="sampling seed (sample mode; top-k mode ignores it; "
      "with --generate, prompt i's request carries seed SEED + i)")
    a("--no-progress", action="store_true", help="no tqdm bar")
    a("--preset", default="default",
      help="the kdk distill preset whose embedded teacher (--teacher default) or tokenizer "
      "(--tokenizer default) is used")
    g = p.add_argument_group(
        "served teacher", "score --data with a teacher in an inference server (the same cache; "
        "resumable), or cache its generations of --prompts (sequence-level KD)")
    g.add_argument("--teacher-url", metavar="URL",
                   help="the server (kdk serve-teacher, vLLM, SGLang; with --generate any "
                   "OpenAI-compatible endpoint) instead of --teacher")
    g.add_argument("--teacher-server", choices=["vllm", "sglang", "kdk"], default="kdk",
                   help="the server's API when scoring --data (--generate uses the OpenAI API)")
    g.add_argument("--tokenizer", metavar="DIR|default",
                   help="local tokenizer (required with --teacher-url): tokenises --data or "
                   "--prompts, maps the server's tokens; 'default': the embedded one of --preset")
    g.add_argument("--teacher-api-key", metavar="KEY", help="bearer token of the server")
    g.add_argument("--teacher-model", metavar="NAME",
                   help="the served model to ask for [the one /v1/models lists]")
    g.add_argument("--teacher-timeout", type=float, default=60.0, metavar="S",
                   help="seconds per request before it is retried (--teacher-retries, then an "
                   "error)")
    g.add_argument("--teacher-retries", type=int, default=3, metavar="N",
                   help="retries of a request that failed to connect, timed out or got a 5xx "
                   "(with backoff), before the command stops with the complete shards kept")
    g.add_argument("--prompts", metavar="FILE",
                   help="with --generate: prompts, one a line (text), or .jsonl strings or "
                   "{\"prompt\": ...} objects")
    g.add_argument("--generate", type=int, metavar="N",
                   help="generate up to N tokens per prompt at T = 1 with the top --top-k "
                   "log-probs of each and cache prompt + generation (generated positions only "
                   "carry targets). Hosted APIs return at most 20 top_logprobs: --top-k <= 20")
    g.add_argument("--api-style", choices=["completions", "chat"], default="completions",
                   help="with --generate: /v1/completions (prompt as token ids; logprobs: K) "
                   "or /v1/chat/completions (one user message; logprobs: true, "
                   "top_logprobs: K)")
    return p


def _cache_teacher(args: argparse.Namespace) -> int:
    from .train.cache_teacher import CacheOptions, cache_teacher

    if args.teacher_url is not None or args.teacher is None:
        return _cache_teacher_served(args)
    opts = CacheOptions(teacher=args.teacher, output=args.output, data=args.data,
                        text_field=args.text_field, top_k=args.top_k, mode=args.mode,
                        samples=args.samples,
                        seq_len=512 if args.seq_len is None else args.seq_len,
                        shard_size=args.shard_size, dtype=args.dtype,
                        batch_size=args.batch_size, device=args.device, seed=args.seed,
                        progress=not args.no_progress, default_preset=args.preset)
    served = [f for f, v in (("--tokenizer", args.tokenizer), ("--prompts", args.prompts),
                             ("--generate", args.generate),
                             ("--teacher-api-key", args.teacher_api_key),
                             ("--teacher-model", args.teacher_model)) if v is not None]
    try:
        if served:
            raise ValueError(f"{', '.join(served)} configure a served teacher: pass "
                             "--teacher-url URL (instead of --teacher)")
        cache_teacher(opts)
    except ValueError as err:
        print(f"kdk cache-teacher: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cache_teacher_served(args: argparse.Namespace) -> int:
    """--teacher-url: score --data (cache_from_server) or generate from --prompts
    (cache_generated)."""
    from .train.cache_from_server import ServedCacheOptions, cache_from_server
    from .train.cache_generated import cache_generated

    try:
        if args.teacher is not None:
            raise ValueError("--teacher and --teacher-url are alternatives: pass one")
        if args.teacher_url is None:
            raise ValueError("pass --teacher DIR|default, or --teacher-url URL for a served "
                             "teacher")
        if args.mode != "topk":
            raise ValueError("--mode sample needs the teacher's full distribution; a served "
                             "teacher returns its top-K only: use --mode topk")
        opts = ServedCacheOptions(
            url=args.teacher_url, output=args.output, tokenizer=args.tokenizer,
            server=args.teacher_server, api_key=args.teacher_api_key, model=args.teacher_model,
            data=args.data, text_field=args.text_field, top_k=args.top_k,
            seq_len=args.seq_len, shard_size=args.shard_size, dtype=args.dtype,
            batch_size=args.batch_size, timeout=args.teacher_timeout,
            retries=args.teacher_retries,
            progress=not args.no_progress, default_preset=args.preset, prompts=args.prompts,
            generate=args.generate, api_style=args.api_style, seed=args.seed)
        (cache_from_server if args.generate is None else cache_generated)(opts)
    except ValueError as err:
        print(f"kdk cache-teacher: error: {err}", file=sys.stderr)
        return 2
    return 0


def _serve_teacher_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve-teacher", help="serve a teacher LM over HTTP for served-teacher distillation",
        description="Serve a causal-LM teacher over HTTP: vLLM's /v1/completions subset "
        "(prompt_logprobs, generation; TRL's VLLMClient works against it), /v1/topk and "
        "/v1/hidden (kdkernels' KDKTeacher), /v1/head, /v1/models, /health. Concurrent "
        "requests are batched per forward. Needs the [serve] extra.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--teacher", required=True,
      help="local Hugging Face causal-LM directory, or 'default' for the embedded teacher of "
      "--preset; the served model id is this argument as given")
    a("--preset", default="default",
      help="the kdk distill preset whose embedded teacher --teacher default serves")
    a("--host", default="127.0.0.1", help="address to bind (0.0.0.0 serves every interface)")
    a("--port", type=int, default=8000, help="TCP port; 0 picks a free one")
    a("--port-file", metavar="FILE", help="write the bound port to FILE (for --port 0)")
    a("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    a("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="the model's dtype")
    a("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/*")
    a("--max-logprobs", type=int, default=256,
      help="the most log-probs per position a request may ask for (top_k, prompt_logprobs)")
    a("--max-batch-tokens", type=int, default=8192,
      help="tokens (rows x longest row) per batched forward")
    a("--max-request-tokens", type=int, default=65536, help="tokens per request")
    a("--max-new-tokens", type=int, default=1024, help="the largest max_tokens of a completion")
    return p


def _serve_teacher(args: argparse.Namespace) -> int:
    need = {"fastapi": "serve", "uvicorn": "serve", "transformers": "train",
            "tokenizers": "train"}
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        extras = ",".join(sorted({need[m] for m in missing}))  # serve, train or both
        print(f"kdk serve-teacher: error: needs {', '.join(missing)} (not installed); install "
              f"the server's extra: pip install 'kdkernels[{extras}]'", file=sys.stderr)
        return 2
    from .serve.main import ServeOptions, serve

    opts = ServeOptions(teacher=args.teacher, preset=args.preset, host=args.host,
                        port=args.port, device=args.device, api_key=args.api_key,
                        dtype=args.dtype, max_logprobs=args.max_logprobs,
                        max_batch_tokens=args.max_batch_tokens,
                        max_request_tokens=args.max_request_tokens,
                        max_new_tokens=args.max_new_tokens, port_file=args.port_file)
    try:
        return serve(opts)
    except ValueError as err:
        print(f"kdk serve-teacher: error: {err}", file=sys.stderr)
        return 2


def _bench_removed() -> int:
    # The benchmarks are scripts of the source tree, which a wheel does not ship: say where.
    print("kdk bench: removed; in a source checkout, run python bench/loss.py "
          "(see bench/README.md)", file=sys.stderr)
    return 2


def _info(argv: list[str]) -> int:
    try:
        from . import info
    except ImportError:
        from . import available_backends

        for name, status in available_backends().items():
            print(f"{name:8s} {status}")
        return 0
    return int(info.main(argv) or 0) if hasattr(info, "main") else 0


def build_parser() -> argparse.ArgumentParser:
    """The `kdk` parser with every subcommand (info parses its own options)."""
    parser = argparse.ArgumentParser(
        prog="kdk", description="kdkernels: knowledge distillation without the logits.")
    sub = parser.add_subparsers(dest="command",
                                metavar="{distill,cache-teacher,serve-teacher,info}")
    _distill_parser(sub)
    _cache_teacher_parser(sub)
    _serve_teacher_parser(sub)
    sub.add_parser("info", add_help=False, help="list backends and builds")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] == "bench":
        return _bench_removed()
    if argv and argv[0] == "info":  # its own parser owns the rest of argv
        return _info(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "serve-teacher":  # its own extras check: [serve] and [train]
        return _serve_teacher(args)
    if (missing := _missing_train_extra(args.command)) is not None:
        print(missing, file=sys.stderr)
        return 2
    if args.command == "cache-teacher":
        return _cache_teacher(args)
    try:
        return _distill(args)
    except ValueError as err:
        print(f"kdk distill: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
