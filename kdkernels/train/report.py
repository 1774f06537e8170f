"""The run report: report.md (held-out CE of teacher and students, the KD benefit, the top-k
student's share of it and its cache's size and write time, time, throughput, memory) and
report.png (loss curves, the held-out comparison, the cache line)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .runtime import bits_per_byte, metrics
from .sources.run_inputs import CACHE, CROSS, EMBEDDED, HF_PAIR


def _evaluated(results: dict[str, dict[str, Any]], *names: str) -> bool:
    return all(results.get(n, {}).get("heldout_ce") is not None for n in names)


def kd_benefit(results: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """CE student minus KD student held-out CE (nats/token; > 0 means KD helped), and the
    share of the CE student's gap to the teacher that KD closed."""
    if not _evaluated(results, "kd", "ce"):
        return None
    kd, ce = results["kd"]["heldout_ce"], results["ce"]["heldout_ce"]
    out = {"nats": ce - kd, "relative": (ce - kd) / ce}
    if "teacher" in results:
        # across tokenizers the teacher's CE counts other tokens: compare in bits per byte
        key = "bits_per_byte" if "bits_per_byte" in results["teacher"] else "heldout_ce"
        kd, ce = results["kd"].get(key), results["ce"].get(key)
        gap = ce - results["teacher"][key] if kd is not None and ce is not None else 0.0
        out["gap_closed"] = (ce - kd) / gap if gap > 0 else float("nan")
    return out


def topk_benefit(results: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """The top-k (cache) student against the CE student: nats gained, and the share of the
    dense KD benefit it keeps, (CE_only - CE_topk) / (CE_only - CE_dense)."""
    if not _evaluated(results, "topk", "ce"):
        return None
    tk, ce = results["topk"]["heldout_ce"], results["ce"]["heldout_ce"]
    out = {"nats": ce - tk}
    if _evaluated(results, "kd"):
        dense = ce - results["kd"]["heldout_ce"]
        out["kept"] = (ce - tk) / dense if dense > 0 else float("nan")
    return out


def loss_agreement(out: Path) -> dict[str, str]:
    """How close the fused and the naive students' training losses stayed, step by step."""
    fused = {r["step"]: r["loss"] for r in metrics.read(out / "kd" / "metrics.jsonl")
             if "loss" in r}
    naive = {r["step"]: r["loss"] for r in metrics.read(out / "naive" / "metrics.jsonl")
             if "loss" in r}
    both = sorted(set(fused) & set(naive))
    if not both:
        return {}
    diffs = [abs(fused[s] - naive[s]) / max(abs(naive[s]), 1e-12) for s in both]
    return {"step-1 loss relative difference (fused vs naive)": f"{diffs[0]:.2e}",
            "max relative training-loss difference over all steps": f"{max(diffs):.2e}"}


_LABELS = {"teacher": "teacher", "kd": "student, KD (fused)", "ce": "student, CE only",
           "naive": "student, KD (naive baseline)", "topk": "student, top-k KD (cache)"}
_COLORS = {"teacher": "#555", "kd": "#1f77b4", "ce": "#ff7f0e", "naive": "#2ca02c",
           "topk": "#9467bd"}


def _sampled(info: dict[str, Any]) -> bool:
    return info.get("mode") == "sample"


def cache_kind(info: dict[str, Any]) -> str:
    """What a cache holds per position, from its manifest's mode: "top-64", or "64-sample"
    (the distinct ids of that many seeded draws), so a sampled cache is never called top-k."""
    if not _sampled(info):
        return f"top-{info['top_k']}"
    return f"{info['samples']}-sample" if info.get("samples") else "sampled"


def _label(key: str, r: dict[str, Any]) -> str:
    if r.get("label"):  # a stage that names itself (a served teacher's student)
        return r["label"]
    cache = r.get("cache")
    return f"student, {cache_kind(cache)} KD (cache)" if cache else _LABELS.get(key, key)


def cache_line(info: dict[str, Any]) -> str:
    """The cache's mode, K, dtype, size on disk, bytes per token and write time, one line."""
    written = (f", written in {info['write_s']:.1f} s" if info.get("write_s") is not None
               else "")
    covered = (f", covering {info['covered_mass']:.0%} of the teacher's mass"
               if info.get("covered_mass") is not None else "")
    slots = f"K = {info['top_k']}"
    if _sampled(info):
        drawn = f"{info['samples']} samples" if info.get("samples") else "sampled ids"
        slots = f"{drawn} per position in K = {info['top_k']} slots,"
    return (f"{slots} {info['dtype']}, {info['tokens']:,} tokens, "
            f"{info['bytes'] / 2**20:.1f} MiB on disk, {info['bytes_per_token']:.1f} bytes per "
            f"token{written}{covered}")


def run_settings(cfg: dict[str, Any], *, kind: str, student: bool, data: bool,
                 topk: bool) -> dict[str, Any]:
    """The configuration (TrainConfig.to_dict()) less what this run never read: the
    embedded default's models and tokenizer with --student, the --teacher dtype without one,
    the tail without a top-k student, generation options with generation off."""
    applies = dict.fromkeys(("teacher_size", "teacher_steps", "teacher_lr", "cache_top_k"),
                            kind == EMBEDDED)
    applies.update(student_size=not student, vocab_size=not student,  # embedded student, BPE
                   corpus_max_mb=not (kind == CACHE and student and not data),
                   text_field=data, teacher_dtype=kind in (HF_PAIR, CROSS), tail=topk,
                   cross_tokenizer=kind == CROSS, merge=kind == CROSS)
    generation = bool(cfg.get("on_policy") or cfg.get("seq_kd"))
    applies.update(dict.fromkeys(TrainConfig.GENERATION_FIELDS, generation))
    return {k: v for k, v in cfg.items() if applies.get(k, True)}


def generation_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """Generation and training time/throughput of students with generated micro-batches
    (tokens/s of kept completion tokens vs of tokens trained on)."""
    out = []
    for key, r in results.items():
        if "gen_s" in r:
            out.append(f"- {_label(key, r)}: {r['generated_batches']} generated micro-batches; "
                       f"generation {r['gen_s']:.1f} s, {r['gen_tokens_per_s']:,.0f} tokens/s "
                       f"({r['gen_tokens']:,} completion tokens); training "
                       f"{r['train_s']:.1f} s, {r['train_tokens_per_s']:,.0f} tokens/s")
    return ["", "Generation vs training:", "", *out] if out else []


def header(title: str, context: dict[str, Any], machine: str) -> list[str]:
    """The title, the run's context as a list, and the machine line."""
    return [f"# {title}", "", *(f"- {k}: {v}" for k, v in context.items()),
            f"- machine: {machine}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}", ""]


def write(out_dir: Path, results: dict[str, dict[str, Any]], cfg_dict: dict[str, Any],
          context: dict[str, Any]) -> Path:
    lines = header("kdk distill report", context, platform.machine())
    lines += ["| model | params | steps | held-out CE (nats/token) | perplexity | wall s "
              "| tokens/s | peak memory MiB |", "|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        source = " (cached)" if r.get("cached") else ""
        ce = r["heldout_ce"]  # None: interrupted before its first evaluation
        ce_txt = "— | —" if ce is None else f"{ce:.4f} | {2.718281828 ** ce:.1f}"
        lines.append(f"| {_label(key, r)}{source} | {r['params'] / 1e6:.2f}M | "
                     f"{r['steps']} | {ce_txt} | "
                     f"{r.get('wall_s', 0):.1f} | {r.get('tokens_per_s', 0):,.0f} | "
                     f"{r.get('peak_mem_mib', 0):,.0f} |")
    lines += generation_lines(results)
    lines += bits_per_byte.report_lines(results, _label)
    benefit = kd_benefit(results)
    if benefit is not None:
        verdict = "KD beats CE" if benefit["nats"] > 0 else "KD does NOT beat CE"
        gap = benefit.get("gap_closed")
        gap_txt = f", closing {gap:.0%} of the CE student's gap to the teacher" if gap else ""
        lines += ["", f"**KD benefit: {benefit['nats']:+.4f} nats/token held-out CE "
                      f"({benefit['relative']:+.2%}) — {verdict}{gap_txt}.**"]
    topk = topk_benefit(results)
    if topk is not None:
        kept = (f", keeping {topk['kept']:.0%} of the dense KD benefit "
                "((CE_only - CE_topk) / (CE_only - CE_dense))" if "kept" in topk else "")
        what = "Top-k" if not _sampled(results["topk"].get("cache") or {}) else "Sampled-cache"
        lines += ["", f"**{what} KD benefit: {topk['nats']:+.4f} nats/token held-out CE over "
                      f"the CE student{kept}.**"]
    if "topk" in results and results["topk"].get("cache"):
        info = results["topk"]["cache"]
        lines += ["", f"Teacher cache ({info['dir']}): {cache_line(info)}."]
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
            ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.5, color=_COLORS.get(key),
                    label=f"{_label(key, r)} train")
        if r.get("evals"):
            ax.plot(*zip(*r["evals"], strict=True), "o-", color=_COLORS.get(key),
                    label=f"{_label(key, r)} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss curves (train CE on hard labels; held-out CE)")
    ax.legend(fontsize=7)
    # across tokenizers, bits per byte (per-token CE counts different tokens per model)
    key = "bits_per_byte" if any("bits_per_byte" in r for r in results.values()) else \
        "heldout_ce"
    names = [k for k in results if results[k].get(key) is not None]
    vals = [results[k][key] for k in names]
    bx.bar([_label(k, results[k]).replace(", ", "\n") for k in names], vals,
           color=[_COLORS.get(k, "#8c564b") for k in names])
    if vals:
        bx.set_ylim(min(vals) - 0.3, max(vals) + 0.1)
    for i, v in enumerate(vals):
        bx.text(i, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    bx.set_title("held-out " + ("bits per byte" if key == "bits_per_byte" else "CE")
                 + " (lower is better)")
    bx.tick_params(axis="x", labelsize=7)
    cache = results.get("topk", {}).get("cache")
    fig.tight_layout(rect=(0, 0.05, 1, 1) if cache else None)
    if cache:
        fig.text(0.99, 0.01, "teacher cache: " + cache_line(cache), ha="right", va="bottom",
                 fontsize=8)
    fig.savefig(out_dir / "report.png", dpi=110)
    plt.close(fig)
