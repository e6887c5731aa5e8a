"""Training curves from metrics.jsonl files: loss, accuracy, clip fractions and limits against step.

``plot_runs({"renorm": "runs/a/metrics.jsonl", "batchnorm": "runs/b/metrics.jsonl"}, "curves.png")`` draws
several runs on shared axes so they can be compared (the demo does this); `brn finetune` calls it with its
own run. Records are those written by :mod:`brn_cli.train.finetune`: ``{"kind": "train", "step", "loss",
"accuracy", "lr", "rmax", "dmax", "r_clip_frac", "d_clip_frac", ...}`` and ``{"kind": "eval", "step",
"val_loss", "val_accuracy"}``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_runs", "read_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file, in order; a torn last line (a killed writer) is skipped."""
    records = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("kind") == kind and r.get(key) is not None:
            xs.append(r["step"])
            ys.append(r[key])
    return xs, ys


def plot_runs(
    runs: Mapping[str, str | os.PathLike],
    out_png: str | os.PathLike,
    *,
    title: str | None = None,
    metric: str = "accuracy",
    train_metric: str = "accuracy",
) -> Path:
    """Write a 2x2 PNG (matplotlib Agg, atomically) comparing the runs; returns its path.

    Panels: (1) train loss (solid) and validation loss (dashed markers); (2) the task's training metric
    (`train_metric`, batch statistics) and its inference-mode validation metric (`metric`: accuracy, mean_iou,
    recall@1, ...); (3) fraction of r and d clipped, averaged over the renorm layers;
    (4) the rmax / dmax limits. Raises ValueError when no run has any record.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brn_cli.storage.atomic import atomic_path

    loaded = {label: read_metrics(path) for label, path in runs.items()}
    if not any(loaded.values()):
        raise ValueError("no metrics records to plot")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100)
    (ax_loss, ax_acc), (ax_clip, ax_lim) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    try:
        for i, (label, records) in enumerate(loaded.items()):
            c = colors[i % len(colors)]
            ax_loss.plot(*_series(records, "train", "loss"), color=c, label=f"{label} train")
            ax_loss.plot(*_series(records, "eval", "val_loss"), "o--", color=c, ms=3, label=f"{label} val")
            xs, ys = _series(records, "train", train_metric)
            ax_acc.plot(xs, [100 * y for y in ys], color=c, alpha=0.6, label=f"{label} train (batch stats)")
            xs, ys = _series(records, "eval", f"val_{metric}")
            ax_acc.plot(xs, [100 * y for y in ys], "o-", color=c, ms=3, label=f"{label} val (inference)")
            xs, ys = _series(records, "train", "r_clip_frac")
            ax_clip.plot(xs, [100 * y for y in ys], color=c, label=f"{label} r clipped")
            xs, ys = _series(records, "train", "d_clip_frac")
            ax_clip.plot(xs, [100 * y for y in ys], ":", color=c, label=f"{label} d clipped")
            ax_lim.plot(*_series(records, "train", "rmax"), color=c, label=f"{label} rmax")
            ax_lim.plot(*_series(records, "train", "dmax"), ":", color=c, label=f"{label} dmax")
        ax_loss.set_ylabel("loss")
        ax_loss.set_yscale("log")
        ax_acc.set_ylabel(f"{metric} (%)")
        ax_clip.set_ylabel("channels clipped (%)")
        ax_lim.set_ylabel("limit")
        for ax, name in (
            (ax_loss, "loss"),
            (ax_acc, metric if metric == train_metric else f"{train_metric} (train), {metric} (val)"),
            (ax_clip, "r / d clipping"),
            (ax_lim, "rmax / dmax"),
        ):
            ax.set_title(name)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with atomic_path(out_png, force=True) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(out_png)
