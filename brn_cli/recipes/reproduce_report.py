"""The report of `brn reproduce`: per-cell figures over seeds, a curve PNG per cell, results.md/.json.

Accuracy is top-1 on the 1,000 validation digits, in %. For every method and cell: the final model's
inference-mode accuracy (mean ± sample std over seeds) and the best inference-mode accuracy along the curve
(mean over seeds of each seed's best); for batchnorm also precise BN and batch statistics (see
:mod:`brn_cli.recipes.reproduce_runs`). The curves are the mean over seeds with a min-max band.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from brn_cli.errors import BrnError
from brn_cli.recipes.reproduce_grid import Cell
from brn_cli.recipes.reproduce_runs import METHODS

__all__ = ["aggregate", "collect_runs", "curve_series", "markdown_report", "plot_cell", "write_report"]

COLORS = {"batchnorm": "tab:blue", "renorm": "tab:orange", "groupnorm": "tab:green"}
GROUP_TITLES = {
    "main": "Main slice: every batch composition x every learning-rate regime",
    "alpha": "Variation: alpha 0.1 (moving averages remember ~10 steps, not ~100)",
    "arch": "Variation: other architectures",
    "steps": "Variation: run length",
    "quick": "Quick check (too few steps to mean anything)",
}


def collect_runs(out: Path) -> list[dict[str, Any]]:
    """Every finished run's record (run.json) under out/runs."""
    records = []
    for path in sorted((out / "runs").glob("**/run.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return records


def run_key(cell: Cell, method: str) -> str:
    """The folder name of a cell's run of `method` (GroupNorm runs are shared between cells)."""
    return cell.groupnorm_key() if method == "groupnorm" else cell.name


def _stats(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def _pct(records: list[dict[str, Any]], field: str) -> dict[str, Any] | None:
    return _stats([100 * r[field] for r in records if r.get(field) is not None])


def _method_cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "final": _pct(runs, "val_accuracy"),
        "best": _pct(runs, "best_accuracy"),
        "batch_stats": _pct(runs, "batch_stats_accuracy"),
        "precise_bn": _pct(runs, "precise_bn_accuracy"),
        "failed": [f"seed {r['seed']}: {r['failed']}" for r in runs if r.get("failed")],
        "curve": curve_series(runs),
    }


def aggregate(cells: list[Cell], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell with any finished run: each method's final, best, baselines, curve and failures, and
    renorm − batchnorm (final, mean over seeds)."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        by_key.setdefault((r["key"], r["method"]), []).append(r)
    rows = []
    for cell in cells:
        runs = {m: sorted(by_key.get((run_key(cell, m), m), []), key=lambda r: r["seed"]) for m in METHODS}
        if not any(runs.values()):
            continue
        row: dict[str, Any] = {"cell": cell.name, "group": cell.group, **cell.__dict__}
        row["batches"] = cell.batches.description
        row["paper"] = cell.batches.paper
        row.update({m: _method_cell(runs[m]) for m in METHODS})
        bn, brn = row["batchnorm"]["final"], row["renorm"]["final"]
        row["difference"] = brn["mean"] - bn["mean"] if bn and brn else None
        rows.append(row)
    return rows


def curve_series(runs: list[dict[str, Any]]) -> dict[str, list[float]] | None:
    """Validation accuracy (%) against step over the seeds: mean, min and max at the steps every seed has."""
    curves = [dict((int(s), 100 * a) for s, a in r.get("curve") or []) for r in runs if not r.get("failed")]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return {
        "steps": steps,
        "mean": [statistics.fmean(c[s] for c in curves) for s in steps],
        "low": [min(c[s] for c in curves) for s in steps],
        "high": [max(c[s] for c in curves) for s in steps],
        "seeds": len(curves),
    }


def _title(row: dict[str, Any]) -> str:
    return (
        f"{row['arch']}, {row['batches']}, lr {row['lr_schedule']}, alpha {row['alpha']:g}, "
        f"{row['steps']} steps"
    )


def plot_cell(row: dict[str, Any], out_png: Path) -> dict[str, Any]:
    """One PNG: inference-mode validation accuracy against step per method (mean line, min-max band over
    seeds), precise BN and batch-statistics finals as markers at the last step. Returns the drawn series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brn_cli.storage.atomic import atomic_path

    drawn: dict[str, Any] = {}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
    try:
        for method, color in COLORS.items():
            series = row[method]["curve"]
            if series is None:
                continue
            n = series["seeds"]
            ax.plot(series["steps"], series["mean"], color=color, label=f"{method} (n={n})")
            ax.fill_between(series["steps"], series["low"], series["high"], color=color, alpha=0.2, lw=0)
            drawn[method] = series
        last = row["steps"]
        for label, stats, marker in (
            ("batchnorm, precise BN", row["batchnorm"]["precise_bn"], "^"),
            ("batchnorm, batch statistics", row["batchnorm"]["batch_stats"], "s"),
        ):
            if stats:
                ax.errorbar([last], [stats["mean"]], fmt=marker, color="tab:blue", mfc="none", label=label)
                drawn[label] = [stats["mean"]]
        ax.set_xlabel("step")
        ax.set_ylabel("validation accuracy, inference mode (%)")
        ax.set_title(_title(row), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        with atomic_path(out_png, force=True) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return drawn


def _fmt(stats: dict[str, Any] | None, best: dict[str, Any] | None = None) -> str:
    if not stats:
        return "-"
    text = f"{stats['mean']:.1f}" + ("" if math.isnan(stats["std"]) else f" ± {stats['std']:.1f}")
    return text + (f" ({best['mean']:.1f})" if best else "")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| cell | batches | lr | batchnorm | precise BN | BN batch stats | renorm | groupnorm "
        "| renorm − batchnorm | paper (Inception-v3, ImageNet) | curves |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        bn, brn, gn = row["batchnorm"], row["renorm"], row["groupnorm"]
        diff = row["difference"]
        failed = [f"{m}: {f}" for m in METHODS for f in row[m]["failed"]]
        lines.append(
            f"| {row['cell']} | {row['batches']} | {row['lr_schedule']} | {_fmt(bn['final'], bn['best'])} "
            f"| {_fmt(bn['precise_bn'])} | {_fmt(bn['batch_stats'])} | {_fmt(brn['final'], brn['best'])} "
            f"| {_fmt(gn['final'], gn['best'])} | {'-' if diff is None else f'{diff:+.1f} pts'} "
            f"| {row['paper']} | [png](curves/{row['cell']}.png) |"
        )
        lines += [f"|   | failed: {f} |" + " |" * 9 for f in failed]
    return lines


def markdown_report(rows: list[dict[str, Any]], grid: dict[str, Any]) -> str:
    """results.md: how it was made, what the columns mean, one table and the curve images per group."""
    lines = [
        "# `brn reproduce`: batchnorm, renorm and their baselines over the grid",
        "",
        f"Command: `{grid.get('command') or 'brn reproduce'}`",
        "",
        f"Seeds {', '.join(map(str, grid.get('seeds', [])))}; SGD (Nesterov 0.9), lr {grid.get('lr')}; "
        f"{grid.get('runs_total', '?')} runs; torch {grid.get('torch')}, brn {grid.get('brn')}, "
        f"{grid.get('threads')} torch thread(s) per run, {grid.get('jobs')} worker process(es).",
        "",
        "Data: the bundled 4,000 training / 1,000 validation MNIST digits; every method of a seed starts from",
        "the same random initialisation and sees the same batches. Accuracy: top-1 in %, the final model in",
        "inference mode (moving averages), mean ± sample std over seeds, the mean of each seed's best along",
        "the curve in brackets. *precise BN*: the final batchnorm model with exact population statistics",
        "computed on the training set. *BN batch stats*: the final batchnorm model normalizing with each",
        "validation batch's statistics, batches drawn like the training batches and as large as a training",
        'normalization group (the paper\'s "training mode", section 4.3). *groupnorm*: every BatchNorm',
        "swapped for GroupNorm (4 channels a group), same loop. renorm − batchnorm: final accuracies.",
    ]
    for group, title in GROUP_TITLES.items():
        part = [r for r in rows if r["group"] == group]
        if not part:
            continue
        lines += ["", f"## {title}", "", *_table(part), ""]
        lines += [f"![{r['cell']}](curves/{r['cell']}.png)" for r in part]
    return "\n".join(lines) + "\n"


def write_report(out: Path, cells: list[Cell], grid: dict[str, Any]) -> dict[str, Any]:
    """Rebuild results.json, results.md and curves/CELL.png from every finished run of `cells` in `out`."""
    from brn_cli.storage.atomic import write_atomic

    rows = aggregate(cells, collect_runs(out))
    if not rows:
        raise BrnError(f"{out}: no finished runs to report")
    (out / "curves").mkdir(exist_ok=True)
    drawn = {row["cell"]: plot_cell(row, out / "curves" / f"{row['cell']}.png") for row in rows}
    summary = {"grid": grid, "rows": rows, "drawn": drawn}
    write_atomic(
        out / "results.json",
        lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8"),
        force=True,
    )
    report = markdown_report(rows, grid)
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(report, encoding="utf-8"), force=True)
    summary["table"] = report
    return summary
