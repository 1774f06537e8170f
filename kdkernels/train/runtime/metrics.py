"""JSONL metrics and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...cache.format import atomic_write_bytes


class JsonlLog:
    """Append-only metrics; on resume, records after the resumed step are dropped so the
    file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [line for line, rec in _records(path) if rec.get("step", 0) <= resume_step]
            # replaced atomically: a kill now must not lose the records up to resume_step
            atomic_write_bytes(path, "".join(f"{line}\n" for line in keep).encode())

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every line; a last line cut short by a kill mid-append is dropped
    (that step is trained again on resume), any other bad line raises."""
    lines = [line for line in path.read_text().splitlines() if line]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return out


def read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [rec for _, rec in _records(path)]


def plot_loss_curves(runs: dict[str, Path], out_png: Path, title: str = "training") -> None:
    """Training loss (and held-out CE where logged) against step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, path in runs.items():
        recs = read(path)
        train = [(r["step"], r["ce"]) for r in recs if "ce" in r and "eval_ce" not in r]
        evals = [(r["step"], r["eval_ce"]) for r in recs if "eval_ce" in r]
        if train:
            line, = ax.plot(*zip(*train, strict=True), lw=1, alpha=0.6, label=f"{name} train CE")
            if evals:
                ax.plot(*zip(*evals, strict=True), "o-", color=line.get_color(),
                        label=f"{name} held-out CE")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
