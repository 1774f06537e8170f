"""Collect `kdk distill` runs (one output directory per seed) into a CSV and a Markdown table:
per seed the teacher / KD / CE-only / top-k held-out CE, the KD benefit, wall time and the
thread count, read from each run's results.json and report.md.

    python bench/experiments/default_run_table.py --csv OUT.csv --md OUT.md RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path

COLUMNS = ["seed", "teacher_ce", "kd_ce", "ce_only_ce", "topk_ce", "kd_benefit",
           "topk_benefit", "teacher_cached", "wall_s", "teacher_s", "kd_s", "ce_s", "topk_s",
           "threads", "thread_reason"]


def _field(report: str, name: str) -> str:
    m = re.search(rf"^- {re.escape(name)}: (.*)$", report, re.M)
    return m.group(1) if m else ""


def row(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    r = res["results"]
    report = (run / "report.md").read_text()
    reason = _field(report, "torch threads")
    ce = lambda k: r.get(k, {}).get("heldout_ce")  # noqa: E731
    wall = lambda k: r.get(k, {}).get("wall_s")  # noqa: E731
    return {"seed": int(_field(report, "seed")), "teacher_ce": ce("teacher"), "kd_ce": ce("kd"),
            "ce_only_ce": ce("ce"), "topk_ce": ce("topk"),
            "kd_benefit": (res.get("kd_benefit") or {}).get("nats"),
            "topk_benefit": (res.get("topk") or {}).get("nats"),
            "teacher_cached": bool(r.get("teacher", {}).get("cached")),
            "wall_s": float(_field(report, "total wall time (s)")),
            "teacher_s": None if r.get("teacher", {}).get("cached") else wall("teacher"),
            "kd_s": wall("kd"), "ce_s": wall("ce"), "topk_s": wall("topk"),
            "threads": int(reason.split()[0].rstrip(":")) if reason else None,
            "thread_reason": reason}


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    shown = ["seed", "teacher_ce", "kd_ce", "ce_only_ce", "topk_ce", "kd_benefit",
             "teacher_cached", "wall_s", "teacher_s", "kd_s", "ce_s", "topk_s", "threads"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(f"{r[c]:.1f}" if c.endswith("_s") and r[c] is not None
                                else _fmt(r[c]) for c in shown) + " |" for r in rows]
    for c in ("kd_ce", "ce_only_ce", "topk_ce", "kd_benefit"):
        vals = [r[c] for r in rows if r[c] is not None]
        if len(vals) > 1:
            lines.append(f"\n{c}: mean {statistics.mean(vals):.4f} ± "
                         f"{statistics.stdev(vals):.4f} (std over {len(vals)} seeds), min "
                         f"{min(vals):.4f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--csv", type=Path, required=True)
    ap.add_argument("--md", type=Path, required=True)
    args = ap.parse_args()
    rows = sorted((row(r) for r in args.runs), key=lambda r: r["seed"])
    with args.csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    args.md.write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
