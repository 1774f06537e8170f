"""The run report: report.md (held-out CE of teacher and students, the KD benefit, time,
throughput, memory) and report.png (loss curves and the held-out comparison)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from . import metrics


def kd_benefit(results: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """CE student minus KD student held-out CE (nats/token; > 0 means KD helped), and the
    share of the CE student's gap to the teacher that KD closed."""
    if "kd" not in results or "ce" not in results:
        return None
    kd, ce = results["kd"]["heldout_ce"], results["ce"]["heldout_ce"]
    out = {"nats": ce - kd, "relative": (ce - kd) / ce}
    if "teacher" in results:
        gap = ce - results["teacher"]["heldout_ce"]
        out["gap_closed"] = (ce - kd) / gap if gap > 0 else float("nan")
    return out


_LABELS = {"teacher": "teacher", "kd": "student, KD (fused)", "ce": "student, CE only",
           "naive": "student, KD (naive baseline)"}


def write(out_dir: Path, results: dict[str, dict[str, Any]], cfg_dict: dict[str, Any],
          context: dict[str, Any]) -> Path:
    lines = ["# kdk distill report", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += [f"- machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}", ""]
    lines += ["| model | params | steps | held-out CE (nats/token) | perplexity | wall s "
              "| tokens/s | peak memory MiB |", "|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        source = " (cached)" if r.get("cached") else ""
        ce = r["heldout_ce"]
        lines.append(f"| {_LABELS.get(key, key)}{source} | {r['params'] / 1e6:.2f}M | "
                     f"{r['steps']} | {ce:.4f} | {2.718281828 ** ce:.1f} | "
                     f"{r.get('wall_s', 0):.1f} | {r.get('tokens_per_s', 0):,.0f} | "
                     f"{r.get('peak_mem_mib', 0):,.0f} |")
    benefit = kd_benefit(results)
    if benefit is not None:
        verdict = "KD beats CE" if benefit["nats"] > 0 else "KD does NOT beat CE"
        gap = benefit.get("gap_closed")
        gap_txt = f", closing {gap:.0%} of the CE student's gap to the teacher" if gap else ""
        lines += ["", f"**KD benefit: {benefit['nats']:+.4f} nats/token held-out CE "
                      f"({benefit['relative']:+.2%}) — {verdict}{gap_txt}.**"]
    if "naive" in results and "kd" in results:
        f, n = results["kd"], results["naive"]
        lines += ["", "Fused vs naive (materialised logits), same steps and data: held-out CE "
                      f"{f['heldout_ce']:.4f} vs {n['heldout_ce']:.4f} "
                      f"(difference {f['heldout_ce'] - n['heldout_ce']:+.2e}); tokens/s "
                      f"{f['tokens_per_s']:,.0f} vs {n['tokens_per_s']:,.0f}; peak memory "
                      f"{f['peak_mem_mib']:,.0f} vs {n['peak_mem_mib']:,.0f} MiB."]
    lines += ["", "Configuration:", "", "```", *(f"{k} = {v}" for k, v in cfg_dict.items()),
              "```", ""]
    md = out_dir / "report.md"
    md.write_text("\n".join(lines))
    _plot(out_dir, results)
    return md


def _plot(out_dir: Path, results: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for key, r in results.items():
        recs = metrics.read(Path(r["dir"]) / "metrics.jsonl") if r.get("dir") else []
        train = [(x["step"], x["ce"]) for x in recs if "ce" in x]
        if train:
            ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.5, label=f"{_LABELS[key]} train")
        if r.get("evals"):
            ax.plot(*zip(*r["evals"], strict=True), "o-", label=f"{_LABELS[key]} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss curves (train CE on hard labels; held-out CE)")
    ax.legend(fontsize=7)
    names = list(results)
    vals = [results[k]["heldout_ce"] for k in names]
    bx.bar([_LABELS[k].replace(", ", "\n") for k in names], vals,
           color=["#555", "#1f77b4", "#ff7f0e", "#2ca02c"][:len(names)])
    low = min(vals)
    bx.set_ylim(low - 0.3, max(vals) + 0.1)
    for i, v in enumerate(vals):
        bx.text(i, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    bx.set_title("held-out CE (lower is better)")
    bx.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "report.png", dpi=110)
    plt.close(fig)
