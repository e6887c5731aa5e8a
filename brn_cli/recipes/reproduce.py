"""`brn reproduce`: the paper's section-4 experiments at small scale, batchnorm against renorm, several seeds.

The paper trains Inception-v3 on ImageNet for 130k steps. Here the same *comparisons* run on the bundled
MNIST digits (4,000 train / 1,000 validation) with the small sample ResNet, through the same fine-tuning loop
users run (:func:`brn_cli.train.finetune.run_finetune`), from a random initialisation as in the paper:

=============  =====================================  ==================================================
setting        batches                                the paper (Inception-v3, ImageNet, top-1)
=============  =====================================  ==================================================
iid-32         i.i.d. batches of 32                   BN 78.3%, BRN 78.5% (130k steps)
micro-4        batch 32 normalized in groups of 4     BN 74.2% at 210k, BRN 76.5% at 130k
micro-2        batch 32 normalized in groups of 2     (not run in the paper)
grouped-2      batch 16 = 8 labels x 2 examples       BN 67%, BRN 78.5% at 120k (16 labels x 2 of 1000)
grouped-16     batch 32 = 2 labels x 16 examples      (not run in the paper)
=============  =====================================  ==================================================

MNIST has 10 labels, so the paper's 16 labels x 2 examples per batch of 32 cannot be drawn; ``grouped-2``
keeps 2 examples per label (batch 16, 8 of the 10 labels) and ``grouped-16`` keeps what made the paper's
batches unusual -- a batch covers a small fraction of the labels (2 of 10) -- at batch 32.

"batchnorm" is the renorm layer with the schedule ``off`` (rmax = 1, dmax = 0 at every step: the same function
and gradients as nn.BatchNorm, microbatches included); "renorm" uses ``paper-scaled`` (the paper's knots
multiplied by steps/130k). Everything else -- initialisation, data order, learning rate -- is identical per
seed. The reported number is the final model's inference-mode validation accuracy (moving averages), as in
the paper; mean and sample standard deviation over seeds.

Each run writes its own folder ``DIR/runs/SETTING/METHOD/seedN/`` (the fine-tuning run folder plus
``run.json``); a run whose ``run.json`` exists is not repeated, so an interrupted reproduction continues
where it stopped, and several processes may work on disjoint settings in one DIR. ``results.json``,
``results.md`` and ``results.png`` are rebuilt from every finished run found in DIR.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brn_cli.errors import BrnError
from brn_cli.progress import Progress, or_null

__all__ = ["METHODS", "SETTINGS", "ReproduceConfig", "Setting", "aggregate", "run_reproduce", "write_report"]

ARCH_SPEC = "brn_cli.samples.models:small_resnet"
NORMALIZE = "0.1314,0.3087"  # the bundled digits' pixel mean and std (brn_cli.recipes.pretrain)
METHODS = {"batchnorm": "off", "renorm": "paper-scaled"}


@dataclass(frozen=True)
class Setting:
    name: str
    batch_size: int
    sampler: str
    microbatch: int | None
    description: str
    paper: str  # the paper's figures for this setting (Inception-v3, ImageNet, top-1), or why there are none
    paper_bn: float | None = None
    paper_brn: float | None = None


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("iid-32", 32, "iid", None, "i.i.d. batches of 32", "BN 78.3% / BRN 78.5% (130k)", 78.3, 78.5),
        Setting(
            "micro-4",
            32,
            "iid",
            4,
            "batch 32, normalized in microbatches of 4",
            "BN 74.2% @210k / BRN 76.5% @130k",
            74.2,
            76.5,
        ),
        Setting("micro-2", 32, "iid", 2, "batch 32, normalized in microbatches of 2", "not in the paper"),
        Setting(
            "grouped-2",
            16,
            "grouped:2",
            None,
            "batch 16 = 8 labels x 2 examples",
            "BN 67% / BRN 78.5% @120k (16 labels x 2)",
            67.0,
            78.5,
        ),
        Setting(
            "grouped-16", 32, "grouped:16", None, "batch 32 = 2 labels x 16 examples", "not in the paper"
        ),
    )
}


@dataclass
class ReproduceConfig:
    output: str = "brn-reproduce"
    settings: Sequence[str] = tuple(SETTINGS)
    seeds: Sequence[int] = (0, 1, 2)
    steps: int = 400
    lr: float = 0.02
    momentum: float = 0.01  # the paper's alpha: rate of the moving mu and sigma
    device: str = "cpu"
    threads: int | None = 1
    force: bool = False


def _run_dir(out: Path, setting: str, method: str, seed: int) -> Path:
    return out / "runs" / setting / method / f"seed{seed}"


def _init_checkpoint(out: Path, seed: int) -> Path:
    """A randomly initialised BatchNorm small_resnet (seeded): every setting and method starts from it."""
    import torch

    from brn_cli.recipes.pretrain import build_sample_model
    from brn_cli.storage.atomic import write_atomic

    path = out / "init" / f"seed{seed}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        state = {k: v.detach().cpu() for k, v in build_sample_model("small_resnet").state_dict().items()}
        write_atomic(path, lambda tmp: torch.save(state, tmp), force=True)
    return path


def _one_run(config: ReproduceConfig, out: Path, setting: Setting, method: str, seed: int) -> dict[str, Any]:
    from brn_cli.samples import SAMPLE_DATA
    from brn_cli.storage.atomic import write_atomic
    from brn_cli.train.finetune import FinetuneConfig, run_finetune

    run_dir = _run_dir(out, setting.name, method, seed)
    ft = FinetuneConfig(
        checkpoint=str(_init_checkpoint(out, seed)),
        arch=ARCH_SPEC,
        data=str(SAMPLE_DATA),
        output=str(run_dir),
        steps=config.steps,
        batch_size=setting.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        rmax_schedule=METHODS[method],
        sampler=setting.sampler,
        microbatch=setting.microbatch,
        normalize=NORMALIZE,
        seed=seed,
        eval_every=max(config.steps // 10, 1),
        device=config.device,
        force=True,
    )
    result = run_finetune(ft, progress=None)
    record = {
        "setting": setting.name,
        "method": method,
        "schedule": METHODS[method],
        "seed": seed,
        "steps": result.steps,
        "lr": config.lr,
        "momentum": config.momentum,
        "val_accuracy": result.final.get("val_accuracy"),
        "val_loss": result.final.get("val_loss"),
        "train_accuracy": result.final.get("train_accuracy"),
        "seconds": result.seconds,
        "device": result.device,
    }
    write_atomic(
        run_dir / "run.json",
        lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8"),
        force=True,
    )
    return record


def collect_runs(out: Path) -> list[dict[str, Any]]:
    """Every finished run's record (run.json) under out/runs."""
    records = []
    for path in sorted((out / "runs").glob("*/*/seed*/run.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return records


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, std


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setting, method): mean and sample std of the final inference accuracy over seeds (in %)."""
    rows = []
    for name, setting in SETTINGS.items():
        row: dict[str, Any] = {"setting": name, "description": setting.description, "paper": setting.paper}
        found = False
        for method in METHODS:
            accs = [
                100 * r["val_accuracy"]
                for r in records
                if r["setting"] == name and r["method"] == method and r.get("val_accuracy") is not None
            ]
            if accs:
                found = True
                mean, std = _mean_std(accs)
                row[method] = {"mean": mean, "std": std, "n": len(accs), "values": accs}
            else:
                row[method] = None
        if found:
            if row["batchnorm"] and row["renorm"]:
                row["difference"] = row["renorm"]["mean"] - row["batchnorm"]["mean"]
            rows.append(row)
    return rows


def _fmt(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "-"
    if math.isnan(cell["std"]):
        return f"{cell['mean']:.1f}% (n={cell['n']})"
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}% (n={cell['n']})"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | batches | batchnorm | renorm | renorm − batchnorm | paper (Inception-v3, ImageNet) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        diff = row.get("difference")
        lines.append(
            f"| {row['setting']} | {row['description']} | {_fmt(row['batchnorm'])} | {_fmt(row['renorm'])} | "
            f"{'-' if diff is None else f'{diff:+.1f} pts'} | {row['paper']} |"
        )
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict[str, Any]], out_png: Path, *, title: str) -> Path:
    """Bar chart: mean inference accuracy per setting, batchnorm vs renorm, std as error bars, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brn_cli.storage.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    try:
        width = 0.38
        for j, (method, color) in enumerate((("batchnorm", "tab:blue"), ("renorm", "tab:orange"))):
            for i, row in enumerate(rows):
                cell = row[method]
                if not cell:
                    continue
                x = i + (j - 0.5) * width
                std = 0.0 if math.isnan(cell["std"]) else cell["std"]
                ax.bar(
                    x,
                    cell["mean"],
                    width,
                    yerr=std,
                    color=color,
                    alpha=0.8,
                    capsize=3,
                    label=method if i == 0 else None,
                )
                ax.plot([x] * len(cell["values"]), cell["values"], "k.", ms=4)
        ax.set_xticks(range(len(rows)), [r["setting"] for r in rows])
        lows = [min(r[m]["values"]) for r in rows for m in METHODS if r[m]]
        ax.set_ylim(max(0.0, min(lows, default=0.0) - 5), 100)
        ax.set_ylabel("validation accuracy, inference mode (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(out_png, force=True) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out_png


def write_report(out: Path, config: ReproduceConfig | None = None) -> dict[str, Any]:
    """Rebuild results.json / results.md / results.png from every finished run in `out`."""
    from brn_cli.storage.atomic import write_atomic

    records = collect_runs(out)
    if not records:
        raise BrnError(f"{out}: no finished runs to report")
    rows = aggregate(records)
    steps = sorted({r["steps"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    summary = {
        "steps": steps,
        "seeds": seeds,
        "config": None
        if config is None
        else {**config.__dict__, "settings": list(config.settings), "seeds": list(config.seeds)},
        "rows": rows,
        "runs": records,
    }
    write_atomic(
        out / "results.json",
        lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8"),
        force=True,
    )
    table = markdown_table(rows)
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(table, encoding="utf-8"), force=True)
    plot_results(
        rows,
        out / "results.png",
        title=f"small ResNet on 4k MNIST digits, {'/'.join(map(str, steps))} steps from scratch, "
        f"seeds {','.join(map(str, seeds))}",
    )
    summary["table"] = table
    return summary


def run_reproduce(
    config: ReproduceConfig,
    *,
    on_run: Callable[[dict[str, Any], int, int], None] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run every (setting, method, seed) not yet finished in `config.output`, then write the report.

    `on_run(record, done, total)` is called after each run (the CLI prints a line); `progress` hears of
    each run as it starts (info: setting, method, seed) and ends. Returns the report dict of
    :func:`write_report`.
    """
    from brn_cli.nn.device import set_threads

    _check_config(config)
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise BrnError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    set_threads(config.threads)

    jobs = [(s, m, seed) for s in config.settings for seed in config.seeds for m in METHODS]
    finished = _finished_runs(config, out, jobs)
    progress = or_null(progress)
    progress.start("reproduce", len(jobs))
    t0 = time.perf_counter()
    try:
        for done, (name, method, seed) in enumerate(jobs, start=1):
            record = finished.get((name, method, seed))
            if record is None:
                progress.update(done - 1, info=f"{name} {method} seed {seed}")
                record = _one_run(config, out, SETTINGS[name], method, seed)
            if on_run is not None:
                on_run(record, done, len(jobs))
            progress.update(done)
    finally:
        progress.stop()
    report = write_report(out, config)
    report["seconds"] = time.perf_counter() - t0
    return report


def _check_config(config: ReproduceConfig) -> None:
    unknown = [s for s in config.settings if s not in SETTINGS]
    if unknown:
        raise BrnError(f"unknown setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
    if not config.seeds:
        raise BrnError("give at least one seed")
    if config.steps < 1:
        raise BrnError(f"`steps` must be >= 1, got {config.steps}")
    if not config.lr > 0:
        raise BrnError(f"`lr` must be > 0, got {config.lr}")
    if not 0 < config.momentum <= 1:
        raise BrnError(f"`momentum` must be in (0, 1], got {config.momentum}")


def _finished_runs(
    config: ReproduceConfig, out: Path, jobs: list[tuple[str, str, int]]
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The records of the jobs already run in `out` (none with `config.force`). Checked before any work:
    runs of another length, rate or momentum must not be mixed into one report."""
    finished: dict[tuple[str, str, int], dict[str, Any]] = {}
    for name, method, seed in jobs:
        marker = _run_dir(out, name, method, seed) / "run.json"
        if marker.is_file() and not config.force:
            record = json.loads(marker.read_text(encoding="utf-8"))
            ran = (record.get("steps"), record.get("lr", config.lr), record.get("momentum", config.momentum))
            if ran != (config.steps, config.lr, config.momentum):
                raise BrnError(
                    f"{marker} was run with steps/lr/momentum {ran}, not "
                    f"{(config.steps, config.lr, config.momentum)}; use another `output` folder or `force=True`"
                )
            finished[(name, method, seed)] = record
    return finished
