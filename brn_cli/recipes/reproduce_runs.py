"""One run of `brn reproduce`: train one method on one cell and seed, evaluate its baselines, record it.

Methods, all trained by the fine-tuning loop users run (:class:`brn_cli.train.trainer.Trainer`) from the same
seeded random initialisation, with the same data order, learning rate and evaluation:

* ``batchnorm``: the renorm layer with the schedule ``off`` (rmax = 1, dmax = 0 at every step: the same
  function and gradients as nn.BatchNorm, microbatches included). Its final model is also scored
  - with **exact population statistics** (precise BN): :func:`brn_cli.evaluation.calibrate.calibrate_data`
    over the whole training set (every running mean and variance recomputed for the final weights), then
    inference mode;
  - with **batch statistics** (the paper's "training mode", section 4.3): every norm layer normalizes with
    its batch's statistics, the validation batches composed like the training ones: drawn by the same
    sampler (i.i.d. or grouped:K), and as large as a training normalization group (32, 16, or the
    microbatch: 4 or 2 i.i.d. examples).
* ``renorm``: ``paper-scaled`` (the paper's rmax/dmax knots times steps / 130k); also scored with batch
  statistics, for the gap.
* ``groupnorm``: every BatchNorm swapped for a GroupNorm (:mod:`brn_cli.nn.groupnorm`) before the first step.

The accuracy along training is the run's inference-mode validation accuracy every ``steps / 16`` steps
(``--quick``: every steps / 3; finetune's metrics.jsonl), kept in ``run.json`` as the curve. Validation
costs about a tenth of a run, the baselines about another tenth.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import warnings
from pathlib import Path
from typing import Any

from brn_cli.errors import BrnError
from brn_cli.recipes.reproduce_grid import Cell
from brn_cli.train.trainer import Trainer

__all__ = ["CURVE_POINTS", "METHODS", "NORMALIZE", "Job", "init_checkpoint", "run_job"]

NORMALIZE = "0.1314,0.3087"  # the bundled digits' pixel mean and std (brn_cli.recipes.pretrain)
METHODS = {"batchnorm": "off", "renorm": "paper-scaled", "groupnorm": None}  # method -> rmax schedule
CURVE_POINTS = 16  # validations per run: a curve of 16 points costs about a tenth of a run
CALIBRATION_BATCH = 100  # precise BN: the 4,000 training digits in 40 batches
QUICK_BATCHES = 4  # quick: batches for calibration and batch statistics


class Job(dict):
    """What a worker process needs to run one (cell, method, seed): plain values, so it pickles."""

    @property
    def run_dir(self) -> Path:
        return Path(self["run_dir"])


def init_checkpoint(out: Path, arch: str, seed: int) -> Path:
    """A randomly initialised BatchNorm model of `arch` (seeded): every method of every cell starts from it."""
    import torch

    from brn_cli.recipes.pretrain import build_sample_model
    from brn_cli.storage.atomic import write_atomic

    path = out / "init" / f"{arch}-seed{seed}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        state = {k: v.detach().cpu() for k, v in build_sample_model(arch).state_dict().items()}
        write_atomic(path, lambda tmp: torch.save(state, tmp), force=True)
    return path


def finetune_config(job: Job):
    from brn_cli.samples import SAMPLE_DATA
    from brn_cli.train.finetune import FinetuneConfig

    cell: Cell = Cell(**job["cell"])
    b = cell.batches
    schedule = METHODS[job["method"]] or "off"
    return FinetuneConfig(
        checkpoint=job["init"],
        arch=f"brn_cli.samples.models:{cell.arch}",
        data=str(SAMPLE_DATA),
        output=job["run_dir"],
        steps=cell.steps,
        batch_size=b.batch_size,
        lr=job["lr"],
        lr_schedule=cell.lr_schedule,
        momentum=cell.alpha if job["method"] != "groupnorm" else 0.01,  # GroupNorm has no moving averages
        rmax_schedule=schedule,
        sampler=b.sampler,
        microbatch=b.microbatch if job["method"] != "groupnorm" else None,
        normalize=NORMALIZE,
        seed=job["seed"],
        eval_every=max(cell.steps // job["curve_points"], 1),
        device=job["device"],
        force=True,
    )


class _UpdateCounter:
    """What the loop asks of its RenormScheduler, for a model without renorm layers: the count of applied
    optimizer updates (the learning rate follows it) and fixed limits rmax = 1, dmax = 0."""

    def __init__(self, optimizer: Any) -> None:
        self.step = 0
        self._hook = optimizer.register_step_post_hook(lambda *_a, **_k: self.advance())

    def advance(self) -> None:
        self.step += 1

    def values(self, step: int | None = None) -> tuple[float, float]:
        return 1.0, 0.0

    def apply(self) -> tuple[float, float]:
        return self.values()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class _Lineage:
    """The loaded BatchNorm checkpoint's lineage without its architecture: the GroupNorm model the run saves
    is not what the sample builder makes, so its checkpoints must not claim to be rebuildable from it."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded

    def lineage(self) -> dict[str, Any]:
        return {**self.loaded.lineage(), "arch_spec": None, "arch_kwargs": {}}


class GroupNormTrainer(Trainer):
    """The same training loop, on the model with every BatchNorm swapped for a GroupNorm."""

    def _build_model(self, resume_state) -> None:
        from brn_cli.data.datasets import fit_data_to_model
        from brn_cli.nn.groupnorm import swap_batchnorm_for_groupnorm
        from brn_cli.storage.checkpoint import load_checkpoint
        from brn_cli.train.build import make_optimizer
        from brn_cli.train.runfolder import nonfinite_tensors

        if resume_state is not None:
            raise BrnError("a GroupNorm run of `brn reproduce` is not resumed: it is run again")
        config = self.config
        loaded = load_checkpoint(config.checkpoint, arch=config.arch)
        model = loaded.model
        self.n_layers = len(swap_batchnorm_for_groupnorm(model))
        self.loaded = _Lineage(loaded)
        fit_data_to_model(model, self.data)
        self.finite_at_start = set(model.state_dict()) - set(nonfinite_tensors(model))
        model.to(self.runtime.device).train()
        self.model = self.forward = model
        self.optimizer = make_optimizer(model, config)
        self.renorm = _UpdateCounter(self.optimizer)
        self.autocast_dtype = None


def _train(job: Job):
    from brn_cli.train.finetune import run_finetune

    config = finetune_config(job)
    if job["method"] != "groupnorm":
        return run_finetune(config)
    with contextlib.ExitStack() as held:
        return GroupNormTrainer(config, held=held).fit()


def _curve(metrics_path: str) -> list[list[float]]:
    from brn_cli.train.curves import read_metrics

    return [
        [r["step"], r["val_accuracy"]]
        for r in read_metrics(metrics_path)
        if r.get("kind") == "eval" and r.get("val_accuracy") is not None
    ]


def _baselines(job: Job) -> dict[str, Any]:
    """Batch-statistics accuracy of the final model (batchnorm, renorm) and, for batchnorm, its accuracy
    after calibrating exact population statistics on the whole training set."""
    from brn_cli.data.datasets import load_data
    from brn_cli.data.samplers import LabelBatchSampler, eval_loader, make_loader
    from brn_cli.evaluation.calibrate import calibrate_data
    from brn_cli.evaluation.evaluate import evaluate
    from brn_cli.samples import SAMPLE_DATA
    from brn_cli.storage.checkpoint import load_checkpoint

    b = Cell(**job["cell"]).batches
    model = load_checkpoint(str(job.run_dir / "last.pt")).model
    bundle = load_data(str(SAMPLE_DATA), seed=job["seed"], normalize=NORMALIZE)
    # validation batches composed like the training batches, as large as a training normalization group
    like_training = make_loader(bundle.val, LabelBatchSampler(bundle.val_labels, b.group, b.sampler, seed=0))
    if job["quick"]:  # the flow, not the figures: a few batches
        like_training = list(itertools.islice(like_training, QUICK_BATCHES))
    found: dict[str, Any] = {
        "batch_stats_accuracy": evaluate(model, like_training, batch_stats=True).accuracy,
        "batch_stats_batches": f"{b.sampler} batches of {b.group}",
    }
    if job["method"] == "batchnorm":
        batches = QUICK_BATCHES if job["quick"] else len(bundle.train) // CALIBRATION_BATCH
        calibrate_data(model, bundle, num_batches=batches, batch_size=CALIBRATION_BATCH, split="train")
        found["precise_bn_accuracy"] = evaluate(model, eval_loader(bundle.val, 256)).accuracy
    return found


def run_job(job: Job) -> dict[str, Any]:
    """Train, score and record one run; returns its record (also written to RUNDIR/run.json). A run that
    fails with a BrnError (its loss became non-finite, say) is recorded as failed with the message: it is
    a result of the grid, not repeated on resume. An interrupted run records nothing."""
    from brn_cli.storage.atomic import write_atomic
    from brn_cli.train.schedule import RenormOpeningWarning
    from brn_cli.train.trainer import FinetuneInterrupted

    t0 = time.perf_counter()
    record: dict[str, Any] = {k: job[k] for k in ("key", "method", "seed", "lr")}
    record["cell"] = dict(job["cell"])
    try:
        with warnings.catch_warnings(record=True) as caught:
            # the renorm schedule's opening check warns on most runs from a random start: kept in the record
            warnings.simplefilter("always", RenormOpeningWarning)
            result = _train(job)
        record["warnings"] = sorted({str(w.message) for w in caught})
        record.update(
            val_accuracy=result.final.get("val_accuracy"),
            best_accuracy=(result.best or {}).get("val_accuracy"),
            train_accuracy=result.final.get("train_accuracy"),
            curve=_curve(result.metrics_path),
            train_seconds=result.seconds,
        )
        if job["method"] != "groupnorm":
            record.update(_baselines(job))
    except FinetuneInterrupted:
        raise
    except BrnError as exc:
        record["failed"] = str(exc)
    record["seconds"] = time.perf_counter() - t0
    write_atomic(
        job.run_dir / "run.json",
        lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8"),
        force=True,
    )
    return record
