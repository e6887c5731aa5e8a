"""`brn reproduce`: where Batch Renorm helps, mapped at small scale over the paper's training regimes.

The paper (Ioffe 2017, section 4) trains Inception-v3 on ImageNet for 130k steps. Here the same *comparisons*
run on the bundled MNIST digits (4,000 train / 1,000 validation) with the sample models, through the
fine-tuning loop users run, from a random initialisation as in the paper, over a grid of

* batch composition: i.i.d. batches of 32; batch 32 normalized in microbatches of 4 or 2 (section 4.2);
  2 labels x 16 examples, 8 labels x 2 examples (section 4.3's 2 per label; MNIST has 10 labels, so the
  paper's 16 labels x 2 cannot be drawn), and 1 label per batch;
* learning-rate regime: constant, step decay (``step``: Inception-v3's x0.94 decays, 81 over the run, as
  the paper's model was trained) and cosine to zero;
* alpha (the moving averages' rate) 0.01 and 0.1; architecture (plain 3-conv CNN, small ResNet, separable
  CNN); length 400, 800 and 1,600 steps; seeds 0, 1, 2 by default.

The grid is a main slice plus one-axis-at-a-time variations around it (:mod:`brn_cli.recipes.reproduce_grid`
says which cells and why). Each cell trains batchnorm, renorm and GroupNorm and scores batchnorm also with
exact population statistics (precise BN) and with batch statistics (:mod:`brn_cli.recipes.reproduce_runs`).
The report (:mod:`brn_cli.recipes.reproduce_report`) is a table with final and best accuracy per cell, a
curve PNG per cell and the paper's figures beside ours where it has them.

Each run writes its own folder ``DIR/runs/KEY/METHOD/seedN/`` (the fine-tuning run folder plus ``run.json``);
a run whose ``run.json`` exists is not repeated, so an interrupted grid continues where it stopped. Runs
go to ``jobs`` worker processes (one torch thread each by default), the main slice first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brn_cli.errors import BrnError
from brn_cli.progress import Progress, or_null
from brn_cli.recipes.reproduce_grid import ARCHS, COMPOSITIONS, Cell, full_grid, quick_grid
from brn_cli.recipes.reproduce_report import run_key, write_report
from brn_cli.recipes.reproduce_runs import CURVE_POINTS, METHODS, Job, init_checkpoint, run_job

__all__ = [
    "ARCHS",
    "COMPOSITIONS",
    "METHODS",
    "ReproduceConfig",
    "plan",
    "run_reproduce",
    "write_grid_report",
]

# A step's cost relative to the plain CNN's at batch 32 (measured, one thread): orders the jobs longest first.
ARCH_COST = {"plain_cnn": 1.0, "small_resnet": 0.9, "separable_cnn": 2.0}
# A plain-CNN run's wall seconds per step at batch 32, validation and baselines included, one thread (measured
# with 2 workers on a 2-core AMD EPYC VM: 10-15 s per 800-step run; twice that under other load).
SECONDS_PER_STEP = 0.017
QUICK_CURVE_POINTS = 3
GROUP_ORDER = ("main", "alpha", "arch", "steps", "quick")


@dataclass
class ReproduceConfig:
    output: str = "brn-reproduce"
    quick: bool = False  # a handful of cells of a few steps (seconds), for CI
    cells: Sequence[str] = ()  # only the cells whose name contains one of these (empty: all)
    seeds: Sequence[int] | None = None  # None: 0, 1, 2 (quick: 0, 1)
    lr: float = 0.02
    jobs: int = 1  # worker processes; 1 runs in this process
    device: str = "cpu"
    threads: int | None = 1  # torch threads per run
    force: bool = False
    command: str | None = None  # the command line, for the report
    extra: dict[str, Any] = field(default_factory=dict)


def seeds_of(config: ReproduceConfig) -> list[int]:
    if config.seeds is None:
        return [0, 1] if config.quick else [0, 1, 2]
    return list(config.seeds)


def grid_cells(config: ReproduceConfig) -> list[Cell]:
    cells = quick_grid() if config.quick else full_grid()
    if config.cells:
        cells = [c for c in cells if any(part in c.name for part in config.cells)]
        if not cells:
            raise BrnError(f"no cell of the grid matches `cells` {','.join(config.cells)}", param="cells")
    return cells


def plan(config: ReproduceConfig) -> list[Job]:
    """Every run of the grid, each once (cells share their GroupNorm runs), in the order they run."""
    out = Path(config.output)
    jobs: dict[tuple[str, str, int], Job] = {}
    for cell in grid_cells(config):
        for seed in seeds_of(config):
            for method in METHODS:
                key = run_key(cell, method)
                jobs.setdefault(
                    (key, method, seed),
                    Job(
                        key=key,
                        method=method,
                        seed=seed,
                        lr=config.lr,
                        cell=dict(cell.__dict__),
                        run_dir=str(out / "runs" / key / method / f"seed{seed}"),
                        init=str(out / "init" / f"{cell.arch}-seed{seed}.pt"),
                        device=config.device,
                        curve_points=QUICK_CURVE_POINTS if config.quick else CURVE_POINTS,
                        quick=config.quick,
                    ),
                )
    # the main slice first (a grid stopped early has its core), the longest runs of each part first
    order = {group: i for i, group in enumerate(GROUP_ORDER)}
    return sorted(jobs.values(), key=lambda j: (order[j["cell"]["group"]], -_cost(j)))


def plan_summary(config: ReproduceConfig) -> dict[str, Any]:
    """What a call would do: the cells by group, the runs planned, finished and to do, and an estimate of
    the wall time of the runs to do (:data:`SECONDS_PER_STEP`, `jobs` processes in parallel)."""
    _check(config)
    jobs = plan(config)
    finished = _finished(config, jobs)
    todo = [j for j in jobs if j["run_dir"] not in finished]
    estimate = sum(_cost(j) for j in todo) * SECONDS_PER_STEP / min(config.jobs, max(len(todo), 1))
    cells = grid_cells(config)
    lines = [f"{c.group:6s} {c.name}" for c in cells]
    lines.append(
        f"{len(cells)} cells, {len(jobs)} runs ({len(finished)} finished, {len(todo)} to do); "
        f"about {estimate / 60:.0f} min with {config.jobs} process(es) on an otherwise idle machine"
    )
    return {
        "cells": [c.name for c in cells],
        "runs": len(jobs),
        "finished": len(finished),
        "todo": len(todo),
        "estimate_seconds": estimate,
        "lines": lines,
    }


def _cost(job: Job) -> float:
    cell = Cell(**job["cell"])
    return ARCH_COST[cell.arch] * cell.steps * cell.batches.batch_size / 32


def _finished(config: ReproduceConfig, jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """The records of the jobs already run (none with `force`), by run folder. Checked before any work: a
    run made with another learning rate must not be mixed into the report."""
    finished = {}
    for job in jobs:
        marker = job.run_dir / "run.json"
        if config.force or not marker.is_file():
            continue
        record = json.loads(marker.read_text(encoding="utf-8"))
        if record.get("lr") != config.lr:
            raise BrnError(
                f"{marker} was run with lr {record.get('lr')}, not {config.lr}; use another `output` "
                "folder or `force`"
            )
        finished[job["run_dir"]] = record
    return finished


def _check(config: ReproduceConfig) -> None:
    if not seeds_of(config):
        raise BrnError("give at least one seed", param="seeds")
    if not config.lr > 0:
        raise BrnError(f"`lr` must be > 0, got {config.lr}", param="lr")
    if config.jobs < 1:
        raise BrnError(f"`jobs` must be >= 1, got {config.jobs}", param="jobs")
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise BrnError(f"output {out} exists and is not a directory", param="output")


def _grid_record(config: ReproduceConfig, jobs: list[Job]) -> dict[str, Any]:
    import torch

    from brn_cli._version import __version__

    return {
        "command": config.command,
        "quick": config.quick,
        "cells": [dict(c.__dict__) for c in grid_cells(config)],
        "seeds": list(seeds_of(config)),
        "lr": config.lr,
        "jobs": config.jobs,
        "threads": config.threads,
        "runs_total": len(jobs),
        "torch": str(torch.__version__),
        "brn": __version__,
    }


def _worker_init(threads: int | None) -> None:
    from brn_cli.nn.device import set_threads

    set_threads(threads)


def _execute(
    config: ReproduceConfig, todo: list[Job], done: Callable[[dict[str, Any]], None], progress: Progress
) -> None:
    """Run `todo` in this process (jobs = 1) or in `jobs` spawned worker processes; `done` hears each record."""
    if config.jobs == 1 or len(todo) <= 1:
        _worker_init(config.threads)
        for job in todo:
            done(run_job(job))
        return
    import concurrent.futures as cf
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no fork of a process that has started torch's threads
    with cf.ProcessPoolExecutor(
        config.jobs, mp_context=context, initializer=_worker_init, initargs=(config.threads,)
    ) as pool:
        pending = [pool.submit(run_job, job) for job in todo]
        try:
            for future in cf.as_completed(pending):
                done(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def run_reproduce(
    config: ReproduceConfig,
    *,
    on_run: Callable[[dict[str, Any], int, int], None] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run every run of the grid not yet finished in `config.output`, then write the report.

    `on_run(record, done, total)` is called after each run (already finished ones first); `progress` hears
    of each run as it ends. Returns the report dict of :func:`write_grid_report` plus ``seconds`` and
    ``ran`` (the runs made by this call).
    """
    _check(config)
    out = Path(config.output)
    jobs = plan(config)
    finished = _finished(config, jobs)
    out.mkdir(parents=True, exist_ok=True)
    grid = _grid_record(config, jobs)
    _write_grid(out, grid)
    todo = [j for j in jobs if j["run_dir"] not in finished]
    for job in todo:
        init_checkpoint(out, Cell(**job["cell"]).arch, job["seed"])
    count = {"done": 0}

    def done(record: dict[str, Any]) -> None:
        count["done"] += 1
        progress.update(count["done"], info=f"{record['key']} {record['method']} seed {record['seed']}")
        if on_run is not None:
            on_run(record, count["done"], len(jobs))

    progress = or_null(progress)
    progress.start("reproduce", len(jobs))
    t0 = time.perf_counter()
    try:
        for record in finished.values():
            done(record)
        _execute(config, todo, done, progress)
    finally:
        progress.stop()
    report = write_grid_report(out)
    report.update(seconds=time.perf_counter() - t0, ran=len(todo))
    return report


def _write_grid(out: Path, grid: dict[str, Any]) -> None:
    from brn_cli.storage.atomic import write_atomic

    text = json.dumps(grid, indent=2) + "\n"
    write_atomic(out / "grid.json", lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True)


def write_grid_report(out: Path) -> dict[str, Any]:
    """Rebuild the report of `out` from its grid.json (the last call's grid) and every finished run."""
    path = out / "grid.json"
    try:
        grid = json.loads(path.read_text(encoding="utf-8"))
        cells = [Cell(**c) for c in grid["cells"]]
    except FileNotFoundError:
        raise BrnError(f"{out}: no grid.json, so no `brn reproduce` ran there") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BrnError(f"{path}: not a grid record of `brn reproduce` ({exc})") from None
    return write_report(out, cells, grid)
