"""The cross-tokenizer (ULD / GOLD hybrid) loss benchmark on CPU: forward plus backward of the
fused loss against TRL's ``ULDLoss`` on materialised logits and against the GEMM floor.

    python bench/uld.py --dtype both --rounds 3 --csv bench/results/cpu/uld_s1.csv
    python bench/uld.py --smoke                       # a tiny shape: does everything run?
    python bench/uld.py --providers fused trl --dtype fp32

S1-like inputs: ~2,048 student answer tokens (4 samples of ~512, after an 8-token prompt and
before an EOS), Vs 32,000, Vt 50,000, Ds 512, Dt 1,024. The answers are random "words" of 1..10
bytes that the student cuts into 1..3 tokens and the teacher into 1..2 (fewer, longer tokens),
so the aligned groups close at word ends and merge several tokens on either side (byte offsets
given: GOLD's extended ULD, "observed" merge, T = 1). Hidden states
~ N(0, 1), heads ~ N(0, (3 / sqrt(D))^2) (peaked softmaxes, as trained LMs have). The hybrid
uses a vocabulary map matching 60% of the student's vocabulary.

Providers (each one worker process per round, bench/harness.py; rounds interleaved, order
alternating; median of every timed call; peak = the worker's max RSS, "above inputs" = peak
minus the RSS once its inputs exist):

    floor         the GEMMs alone: student logits over the student's answer rows, teacher
                  logits over the teacher's, grad_hidden and grad_weight of the student rows,
                  chunked (256 rows), fp32 grad_weight accumulator: what any fused loss pays
    fused         kdkernels.fused_linear_uld_loss, plain ULD (impl auto: the C++ sort on CPU)
    fused-torch   the same with impl="torch" (torch.sort of each chunk)
    fused-hybrid  GOLD's hybrid (vocab_map)
    topk-256      uld_top_k=256 (torch.topk instead of a sort)
    topk-8192     uld_top_k=8192
    trl           TRL 1.16 ULDLoss (use_extended_uld) on materialised logits: the logits GEMMs,
                  its loss, and backward through both
    trl-hybrid    the same with uld_use_hybrid_loss (its vocabulary mapping set from vocab_map)

fused and trl (and fused-hybrid and trl-hybrid) compute the same loss: the run checks that
their losses agree (fp32 1e-4, bf16 3e-2 relative: TRL runs its softmax and sort in bf16).
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench import harness  # noqa: E402

PROVIDERS = ("floor", "fused", "fused-torch", "fused-hybrid", "topk-256", "topk-8192", "trl",
             "trl-hybrid")
PAIRS = (("fused", "trl"), ("fused-hybrid", "trl-hybrid"), ("fused-torch", "trl"))
LOSS_RTOL = {"fp32": 1e-4, "bf16": 3e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLOOR_CHUNK = 256


@dataclass(frozen=True)
class Shape:
    tokens: int  # student answer tokens over the batch
    vs: int
    vt: int
    ds: int
    dt: int
    samples: int = 4

    def __str__(self) -> str:
        return f"{self.tokens},{self.vs},{self.vt},{self.ds},{self.dt},{self.samples}"


S1 = Shape(2048, 32000, 50000, 512, 1024, 4)
SMOKE = Shape(48, 300, 410, 16, 24, 3)


def parse_shape(text: str) -> Shape:
    if text == "S1":
        return S1
    if text == "smoke":
        return SMOKE
    parts = [int(p) for p in text.split(",")]
    if len(parts) not in (5, 6) or min(parts) < 1:
        raise ValueError(f"shape: S1, smoke or tokens,Vs,Vt,Ds,Dt[,samples]; got {text!r}")
    return Shape(*parts)


# ----------------------------------------------------------------------------- inputs


def _split(rnd: random.Random, start: int, n: int, most: int) -> list[tuple[int, int]]:
    """Byte spans of one word of n bytes cut into 1..most tokens."""
    k = rnd.randint(1, max(1, min(most, n)))
    cuts = sorted(rnd.sample(range(1, n), k - 1)) if k > 1 else []
    ends = [start + c for c in cuts] + [start + n]
    return list(zip([start] + ends[:-1], ends, strict=True))


def make_inputs(shape: Shape, dtype: torch.dtype, seed: int = 0) -> dict:
    """The loss's inputs: hidden states, heads, labels, ids, byte offsets, vocab_map."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    prompt = 8
    per = shape.tokens // shape.samples
    sides = {"student": [], "teacher": []}
    for _ in range(shape.samples):
        # words of 1..10 bytes; the student cuts each into 1..3 tokens, the teacher (a larger
        # vocabulary) into 1..2: groups close at word ends, where both tokenizations agree
        s_offs, t_offs, start = [], [], 0
        while len(s_offs) < per:
            n = rnd.randint(1, 10)
            s_offs += _split(rnd, start, n, 3)
            t_offs += _split(rnd, start, n, 2)
            start += n
        n_bytes = start
        for name, offs, vocab in (("student", s_offs, shape.vs), ("teacher", t_offs, shape.vt)):
            offs = [(0, 0)] * prompt + offs + [(n_bytes, n_bytes)]  # prompt, answer, EOS
            ids = torch.randint(0, vocab, (len(offs),), generator=gen)
            labels = ids.clone()
            labels[:prompt] = -100
            sides[name].append((ids, labels, torch.tensor(offs)))
    out = {}
    for name, rows in sides.items():
        L = max(len(r[0]) for r in rows)
        ids = torch.zeros(shape.samples, L, dtype=torch.long)
        labels = torch.full((shape.samples, L), -100, dtype=torch.long)
        offs = torch.zeros(shape.samples, L, 2, dtype=torch.long)
        for b, (i, lab, o) in enumerate(rows):
            ids[b, :len(i)], labels[b, :len(lab)], offs[b, :len(o)] = i, lab, o
        out[f"{name}_input_ids"], out[f"{name}_labels"], out[f"{name}_offsets"] = ids, labels, offs

    def rnd_t(*size, std):
        return (torch.randn(*size, generator=gen) * std).to(dtype)

    ls, lt = out["student_labels"].shape[1], out["teacher_labels"].shape[1]
    out["h"] = rnd_t(shape.samples, ls, shape.ds, std=1.0).requires_grad_(True)
    out["w"] = rnd_t(shape.vs, shape.ds, std=3 / shape.ds**0.5).requires_grad_(True)
    out["g"] = rnd_t(shape.samples, lt, shape.dt, std=1.0)
    out["u"] = rnd_t(shape.vt, shape.dt, std=3 / shape.dt**0.5)
    n_match = int(0.6 * shape.vs)
    vmap = torch.full((shape.vt,), -1, dtype=torch.long)
    vmap[torch.randperm(shape.vt, generator=gen)[:n_match]] = torch.randperm(
        shape.vs, generator=gen)[:n_match]
    out["vocab_map"] = vmap
    return out


def _loss_args(inp: dict) -> tuple:
    return (inp["student_labels"], inp["teacher_labels"], inp["student_input_ids"],
            inp["teacher_input_ids"], inp["student_offsets"], inp["teacher_offsets"])


def clear_grads(inp: dict) -> None:
    inp["h"].grad = inp["w"].grad = None


# ----------------------------------------------------------------------------- providers


def _answer_rows(labels: torch.Tensor) -> torch.Tensor:
    return torch.nonzero((labels != -100).reshape(-1)).squeeze(1)


def _floor(inp: dict):
    from kdkernels.engine import gemm

    h, w, g, u = inp["h"], inp["w"], inp["g"], inp["u"]
    rows_s = _answer_rows(inp["student_labels"])
    rows_t = _answer_rows(inp["teacher_labels"])

    def run() -> None:
        cd_s = gemm.compute_dtype(h.dtype, h.device)
        cd_t = gemm.compute_dtype(g.dtype, g.device)
        wc, uc = w.detach().to(cd_s), u.to(cd_t)
        h2 = h.detach().reshape(-1, h.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        zs = torch.empty(FLOOR_CHUNK, w.shape[0], dtype=gemm.logits_dtype(cd_s, h.device))
        zt = torch.empty(FLOOR_CHUNK, u.shape[0], dtype=gemm.logits_dtype(cd_t, g.device))
        gh = torch.zeros(h2.shape, dtype=h.dtype)
        gw = torch.zeros(w.shape, dtype=torch.float32)
        for s in range(0, rows_t.numel(), FLOOR_CHUNK):
            r = rows_t[s:s + FLOOR_CHUNK]
            gemm.logits_into(g2.index_select(0, r).to(cd_t), uc, None, zt[:r.numel()])
        for s in range(0, rows_s.numel(), FLOOR_CHUNK):
            r = rows_s[s:s + FLOOR_CHUNK]
            x = h2.index_select(0, r).to(cd_s)
            z = gemm.logits_into(x, wc, None, zs[:r.numel()])
            d = z if z.dtype == cd_s else z.to(cd_s)
            gh.index_add_(0, r, (d @ wc).to(gh.dtype))
            gemm.accumulate_matmul_(gw, d.t(), x)
        gw.to(w.dtype)
        return None

    return run


def _fused(inp: dict, **kw):
    from kdkernels.uld.fused import fused_linear_uld_loss

    def run():
        loss = fused_linear_uld_loss(inp["h"], inp["w"], inp["g"], inp["u"], *_loss_args(inp),
                                     **kw)
        loss.backward()
        return loss.detach()

    return run


def _trl(inp: dict, hybrid: bool):
    import types

    from trl.experimental.gold.gold_trainer import ULDLoss

    cfg = types.SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=True, uld_skip_teacher_eos=True,
        use_extended_uld=True, uld_token_merge_strategy="observed", uld_use_hybrid_loss=hybrid,
        uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    loss_fn = ULDLoss(cfg)
    if hybrid:  # its mapping, as _initialize_vocabulary_mapping builds it from tokenizers
        vmap = inp["vocab_map"]
        t_ids = torch.nonzero(vmap >= 0).squeeze(1)
        loss_fn._vocab_mapping = dict(zip(t_ids.tolist(), vmap[t_ids].tolist(), strict=True))
        loss_fn._teacher_matched_ids = set(t_ids.tolist())
        loss_fn._student_matched_ids = set(vmap[t_ids].tolist())
        loss_fn.mapping_tensor = vmap[: int(t_ids.max()) + 1].clone()

    def run():
        zs = inp["h"] @ inp["w"].t()
        with torch.no_grad():
            zt = inp["g"] @ inp["u"].t()
        loss = loss_fn(zs, zt, *_loss_args(inp))
        loss.backward()
        return loss.detach()

    return run


def build(name: str, inp: dict):
    if name == "floor":
        return _floor(inp)
    if name == "fused":
        return _fused(inp)
    if name == "fused-torch":
        return _fused(inp, impl="torch")
    if name == "fused-hybrid":
        return _fused(inp, vocab_map=inp["vocab_map"])
    if name.startswith("topk-"):
        return _fused(inp, uld_top_k=int(name.split("-")[1]))
    if name in ("trl", "trl-hybrid"):
        return _trl(inp, name == "trl-hybrid")
    raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(PROVIDERS)}")


# ----------------------------------------------------------------------------- worker


def _measure(args) -> dict:
    shape = parse_shape(args.shape)
    inp = make_inputs(shape, DTYPES[args.dtype], args.seed)
    run = build(args.worker, inp)  # imports (TRL's: transformers) before the baseline
    base = harness.rss_mib()
    times, out = harness.time_calls(run, lambda: clear_grads(inp), args.repeats, args.warmup)
    return {"times_ms": times, "loss": None if out is None else float(out), "base_mib": base}


# ----------------------------------------------------------------------------- parent


@dataclass
class Result:
    provider: str
    dtype: str
    status: str = "ok"
    times_ms: list[float] = field(default_factory=list)
    ms_median: float | None = None
    peak_mib: float | None = None
    base_mib: float | None = None
    loss: float | None = None
    error: str = ""

    @property
    def above_mib(self) -> float | None:
        ok = self.peak_mib is not None and self.base_mib is not None
        return self.peak_mib - self.base_mib if ok else None


def _run_one(name: str, dtype: str, args, limits: harness.Limits) -> Result:
    argv = [str(Path(__file__).resolve()), "--worker", name, "--dtype", dtype, "--shape",
            args.shape, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--seed", str(args.seed)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    res, _, wait_peak = harness.spawn_worker(argv, limits, args.threads)
    return Result(name, dtype, res["status"], res.get("times_ms", []), None,
                  res.get("peak_mib") or wait_peak, res.get("base_mib"), res.get("loss"),
                  res.get("error", ""))


def _merge(runs: list[Result]) -> Result:
    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        return runs[0]
    out = Result(**{**asdict(ok[0]), "times_ms": [t for r in ok for t in r.times_ms]})
    out.ms_median = statistics.median(out.times_ms)
    out.peak_mib = max(r.peak_mib for r in ok)
    bases = [r.base_mib for r in ok if r.base_mib is not None]
    out.base_mib = min(bases) if bases else None
    return out


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(results: list[Result]) -> str:
    floors = {r.dtype: r.ms_median for r in results if r.provider == "floor" and r.ms_median}
    trl = {r.dtype: r for r in results if r.provider == "trl" and r.ms_median}
    lines = ["| provider | dtype | ms (median) | x floor | x faster than TRL | peak MiB | "
             "above inputs MiB | / TRL's above | loss | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        f, t = floors.get(r.dtype), trl.get(r.dtype)
        speed = t.ms_median / r.ms_median if t and r.ms_median else None
        mem = (r.above_mib / t.above_mib if t and r.above_mib is not None and t.above_mib
               else None)
        lines.append(
            f"| {r.provider} | {r.dtype} | {_fmt(r.ms_median, '.0f')} | "
            f"{_fmt(r.ms_median / f if f and r.ms_median else None, '.2f')} | "
            f"{_fmt(speed, '.2f')} | {_fmt(r.peak_mib, '.0f')} | {_fmt(r.above_mib, '.0f')} | "
            f"{_fmt(mem, '.2f')} | {_fmt(r.loss, '.6f')} | "
            f"{r.status}{': ' + r.error if r.error else ''} |")
    return "\n".join(lines)


def disagreements(results: list[Result]) -> list[str]:
    by = {(r.provider, r.dtype): r for r in results}
    bad = []
    for a, b in PAIRS:
        for dtype in DTYPES:
            ra, rb = by.get((a, dtype)), by.get((b, dtype))
            if not (ra and rb and ra.loss is not None and rb.loss is not None):
                continue
            if not math.isfinite(ra.loss) or abs(ra.loss - rb.loss) > LOSS_RTOL[dtype] * max(
                    abs(rb.loss), 1e-12):
                bad.append(f"{a} vs {b} ({dtype}): loss {ra.loss:.6g} vs {rb.loss:.6g}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"])
    p.add_argument("--shape", default="S1", help="S1, smoke or tokens,Vs,Vt,Ds,Dt[,samples]")
    p.add_argument("--smoke", action="store_true", help="the tiny shape, 1 round, 1 repeat")
    p.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None)
    p.add_argument("--mem-limit-mib", type=float, default=20 * 1024)
    p.add_argument("--min-available-mib", type=float, default=1024)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.rounds, args.repeats = "smoke", 1, 1
    parse_shape(args.shape)
    if args.worker:
        return harness.worker_main(lambda: _measure(args), args.result, args.threads)
    names = list(PROVIDERS) if not args.providers else (
        ["floor"] + [n for n in args.providers if n != "floor"])
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    limits = harness.Limits(args.mem_limit_mib, args.min_available_mib, args.timeout)
    results = []
    for dtype in dtypes:
        got: dict[str, list[Result]] = {n: [] for n in names}
        for rnd in range(args.rounds):
            for name in harness.round_order(names, rnd):
                print(f"[uld] round {rnd + 1}/{args.rounds}: {name} {dtype} ...", file=sys.stderr,
                      flush=True)
                r = _run_one(name, dtype, args, limits)
                ms = statistics.median(r.times_ms) if r.times_ms else None
                print(f"[uld]   {r.status} {_fmt(ms, '.1f')} ms, peak "
                      f"{_fmt(r.peak_mib, '.0f')} MiB {r.error}", file=sys.stderr, flush=True)
                got[name].append(r)
        results += [_merge(got[n]) for n in names]
    problems = disagreements(results)
    problems += [f"{r.provider} {r.dtype}: {r.status} {r.error}" for r in results
                 if r.status in ("error", "crash", "timeout")]
    shape = parse_shape(args.shape)
    print(f"ULD / GOLD-hybrid loss, forward + backward; {args.shape}: {shape.tokens} student "
          f"answer tokens in {shape.samples} samples, Vs={shape.vs}, Vt={shape.vt}, "
          f"Ds={shape.ds}, Dt={shape.dt}; median of {args.repeats} x {args.rounds} interleaved "
          f"rounds; {args.threads or torch.get_num_threads()} threads; {harness.machine()}; "
          "one process per provider (peak = its max RSS).\n")
    print(table(results))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["provider", "dtype", "status", "ms_median", "times_ms", "peak_mib",
                         "base_mib", "above_inputs_mib", "loss", "error", "shape", "machine"])
            for r in results:
                wr.writerow([r.provider, r.dtype, r.status, r.ms_median,
                             " ".join(f"{t:.1f}" for t in r.times_ms), r.peak_mib, r.base_mib,
                             r.above_mib, r.loss, r.error, args.shape, harness.machine()])
    for msg in problems:
        print(f"[uld] PROBLEM: {msg}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
