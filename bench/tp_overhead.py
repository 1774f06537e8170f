"""Vocab-parallel overhead on CPU: one process vs 2 gloo ranks, fused_linear_kd_loss fwd+bwd.

    python bench/tp_overhead.py [--n 2048 --vocab 32000 --ds 512 --dt 1024 --dtype bf16]

Runs each configuration in a fresh process (median of --reps timed calls after a warm-up):
  single-2t   one process, 2 threads, full heads, no vocab_parallel (the baseline)
  vp1-2t      the same through VocabParallel over a group of size 1 (the reducer's own cost)
  single-1t   one process, 1 thread, full heads
  tp2-1t      2 ranks x 1 thread, half the vocab rows each (same cores as single-2t)
For the ranked runs it also reports the time spent inside the reducer's collectives
(which includes waiting for the slower rank) as a share of the loss time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench import harness  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed_reducer(acc: dict) -> None:
    """Wrap the reducer's collectives with timers (bench only)."""
    from kdkernels import parallel

    for name in ("merge_stats", "sum_rows", "finish_grad_hidden"):
        fn = getattr(parallel.VocabParallelReducer, name)

        def timed(self, x, _fn=fn, _name=name):
            t0 = time.perf_counter()
            out = _fn(self, x)
            acc[_name] = acc.get(_name, 0.0) + time.perf_counter() - t0
            acc[_name + "_calls"] = acc.get(_name + "_calls", 0) + 1
            return out

        setattr(parallel.VocabParallelReducer, name, timed)


def worker(cfg: dict) -> dict:
    import torch.distributed as dist

    import kdkernels

    torch.set_num_threads(cfg["threads"])
    rank, world = cfg.get("rank", 0), cfg.get("world", 0)
    if world:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}",
                                rank=rank, world_size=world)
    dtype = getattr(torch, cfg["dtype"])
    gen = torch.Generator().manual_seed(0)
    n, v, ds, dt = cfg["n"], cfg["vocab"], cfg["ds"], cfg["dt"]
    h = torch.randn(n, ds, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(n, dt, generator=gen).to(dtype)
    w_full = (torch.randn(v, ds, generator=gen) * ds**-0.5 * 3).to(dtype)
    u_full = (torch.randn(v, dt, generator=gen) * dt**-0.5 * 3).to(dtype)
    parts = max(world, 1)
    lo, hi = rank * v // parts, (rank + 1) * v // parts
    w = w_full[lo:hi].clone().requires_grad_()
    u = u_full[lo:hi].clone()
    del w_full, u_full
    vp = kdkernels.VocabParallel() if world else None
    acc: dict = {}
    if world:
        _timed_reducer(acc)
    times = []
    for i in range(cfg["reps"] + 1):
        if world:
            dist.barrier()
        t0 = time.perf_counter()
        loss = kdkernels.fused_linear_kd_loss(h, w, g, u, vocab_parallel=vp, impl=cfg["impl"])
        loss.backward()
        times.append(time.perf_counter() - t0)
        if i == 0:
            acc.clear()
        h.grad = w.grad = None
    out = {"median_ms": 1e3 * statistics.median(times[1:]),
           "loss": float(loss), **{k: (1e3 * val / cfg["reps"] if not k.endswith("_calls")
                                      else val // cfg["reps"]) for k, val in acc.items()}}
    if world:
        dist.destroy_process_group()
    return out


def launch(cfg: dict, world: int = 0) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "PYTHONWARNINGS": "ignore"}
    cfgs = [dict(cfg)] if not world else [dict(cfg, rank=r, world=world, port=cfg["port"])
                                          for r in range(world)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(c)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for c in cfgs]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ds", type=int, default=512)
    ap.add_argument("--dt", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--impl", default="auto")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    base = dict(n=args.n, vocab=args.vocab, ds=args.ds, dt=args.dt, dtype=args.dtype,
                reps=args.reps, impl=args.impl)
    rows = {
        "single-2t": launch(dict(base, threads=2)),
        "vp1-2t": launch(dict(base, threads=2, port=_port()), world=1),
        "single-1t": launch(dict(base, threads=1)),
        "tp2-1t": launch(dict(base, threads=1, port=_port()), world=2),
    }
    print(f"N={args.n} V={args.vocab} Ds={args.ds} Dt={args.dt} {args.dtype}, "
          f"impl={args.impl}, fwd+bwd, median of {args.reps}; {harness.machine()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| config | rank | loss ms | collectives ms (stats / mix / grad_h) | share |")
    print("|---|---|---|---|---|")
    for name, res in rows.items():
        for r, o in enumerate(res):
            coll = [o.get(k, 0.0) for k in ("merge_stats", "sum_rows", "finish_grad_hidden")]
            print(f"| {name} | {r} | {o['median_ms']:.0f} | "
                  f"{coll[0]:.1f} / {coll[1]:.1f} / {coll[2]:.1f} "
                  f"({o.get('merge_stats_calls', 0)} chunks) | "
                  f"{100 * sum(coll) / o['median_ms']:.1f}% |")


if __name__ == "__main__":
    main()
