"""Metrics as JSON lines, and a PNG of the loss curves (matplotlib, Agg)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "plot_losses"]

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, lines after the resumed step are dropped so the
    curve has no duplicated steps."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(path: Path, out_png: Path, title: str) -> Path | None:
    """One panel per ``loss*`` key of ``path`` against the step, written to ``out_png``."""
    records = read_metrics(path)
    keys = sorted({k for r in records for k in r if k.startswith("loss")})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        if pts and min(p[1] for p in pts) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
