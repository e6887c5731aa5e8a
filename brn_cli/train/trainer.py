"""The training engine: build a run, then one loop that reads top to bottom (see :meth:`Trainer.fit`).

    for each step:
        x, y   = next batch                     # data order: a pure function of (seed, epoch, index)
        lr     = schedule(updates)              # lr, rmax, dmax follow the applied optimizer updates
        loss   = task.loss(model(x), y)         # renorm layers clip r, d at rmax(updates), dmax(updates)
        loss.backward(); optimizer.step()       # RenormScheduler's post-hook advances rmax, dmax
        log every log_every steps; save last.pt every save_every steps; validate every eval_every steps

Why it is written this way:

* Batch composition (the paper's section 4). ``sampler="grouped:K"`` draws batches of batch/K labels with K
  examples each (non-i.i.d., section 4.3); ``microbatch=K`` normalizes groups of K consecutive examples
  separately while the gradient is taken over the whole batch (section 4.2). Under such batches BatchNorm's
  training function drifts away from its inference function; Batch Renorm trains the function it will use
  at inference (r, d correct the minibatch statistics towards the moving averages).
* ``step`` counts iterations (batches drawn; it decides steps, eval_every, save_every and the data
  position); ``updates`` counts optimizer steps actually applied (an ``optimizer.step`` post-hook of
  :class:`~brn_cli.train.schedule.RenormScheduler`). The two differ only under ``amp="fp16"``, whose
  GradScaler skips the update of a step with inf/NaN gradients: that step must not move lr, rmax or dmax.
* Exact resume. Everything that decides the trajectory is a pure function of the step or held by the
  :class:`~brn_cli.train.state.TrainState` saved in ``last.pt``. A run killed with SIGKILL and resumed from
  its last checkpoint ends with bit-identical weights (CPU); ``metrics.jsonl`` is truncated to the
  checkpoint's step on resume, so it reads as if the run had never stopped.
* No failure loses a run. ``last.pt`` is saved before the validation of its step (a resumed run does a
  pending validation first); every save checks that the weights and statistics are finite, and the loss,
  summed on the device every step, is checked at each log line, save and the last step; one process at a
  time trains in a run folder (:mod:`brn_cli.train.runfolder`).
* Device and process identity live in :class:`Runtime`. Logging, metrics and checkpoint writing happen on
  the main process only; the sampler takes ``num_replicas`` and ``rank``; so distributed training is a local
  change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brn_cli.errors import BrnError
from brn_cli.progress import Progress, or_null
from brn_cli.storage.atomic import folder_lock
from brn_cli.tasks import Classification, make_task
from brn_cli.train.build import (
    Runtime,
    StopRequest,
    load_model,
    make_loader,
    make_optimizer,
    make_runtime,
    make_val_loader,
    read_resume_state,
)
from brn_cli.train.config import (
    FinetuneConfig,
    data_options,
    per_process_batch,
    task_data_options,
    task_options,
    validate,
)
from brn_cli.train.runfolder import (
    BEST,
    CURVES,
    LAST,
    RunFiles,
    check_same_data,
    data_fingerprint,
    nonfinite_tensors,
    prepare_run_dir,
    truncate_metrics,
)
from brn_cli.train.state import LRSchedule, MetricWindow, RngState, TrainState

__all__ = ["FinetuneInterrupted", "FinetuneResult", "Runtime", "Trainer"]


@dataclass
class FinetuneResult:
    """What a run produced. `final` / `best`: {"step", "train_loss", "train_accuracy", "val_loss", ...}."""

    run_dir: str
    steps: int
    final: dict
    best: dict
    metrics_path: str
    resumed_from: int | None = None
    device: str = "cpu"
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    metric: str = "accuracy"  # the task's primary validation metric: `val_<metric>` in final and best


class FinetuneInterrupted(BrnError):
    """SIGINT / SIGTERM arrived: last.pt was saved; exit code 130 / 143 as a shell would report."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)
        self.signum = int(signum)


def progress_line(
    train: dict[str, Any], val: dict[str, Any], metric: str = "accuracy", train_metric: str = ""
) -> str:
    """The live status of a run: loss, the training metric, lr, rmax/dmax, clip fractions, validation metric."""
    train_metric = train_metric or metric
    short = "acc" if train_metric == "accuracy" else train_metric
    parts = [
        f"loss {train['loss']:.4f}",
        f"{short} {100 * train[train_metric]:.1f}%",
        f"lr {train['lr']:.3g}",
        f"rmax {train['rmax']:.3g} dmax {train['dmax']:.3g}",
    ]
    if "r_clip_frac" in train:
        parts.append(f"clip r {100 * train['r_clip_frac']:.0f}% d {100 * train['d_clip_frac']:.0f}%")
    if val:
        label = "val" if metric == "accuracy" else f"val {metric}"
        parts.append(f"{label} {100 * val[f'val_{metric}']:.1f}%")
    return "  ".join(parts)


def check_task_on_data(task: Any, model: Any, data: Any, count: int = 2) -> None:
    """One inference-mode forward of the first `count` training examples: the output and the targets must
    have the task's shapes, and its loss (a user's own included) and training metric must compute. The
    model's training flags are left as they were."""
    import torch

    items = [data.train[i] for i in range(min(count, len(data.train)))]
    x = torch.stack([torch.as_tensor(item[0], dtype=torch.float32) for item in items])
    y = torch.stack([torch.as_tensor(item[1]) for item in items])
    reference = next(iter(model.parameters()), None)
    if reference is not None:
        x, y = x.to(reference.device), y.to(reference.device)
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            output = model(x)
            task.check(output, y, data.num_classes)
            task.loss(output, y)
            task.batch_metric(output, y)
    except BrnError as exc:
        if not data.source or str(exc).startswith(data.source):
            raise
        raise BrnError(f"{data.source}: {exc}", param=exc.param) from None
    finally:
        for module, flag in flags.items():
            module.train(flag)


def _plot_curves(metrics_path: Path, out_png: Path, metric: str, train_metric: str) -> None:
    from brn_cli.train.curves import plot_runs

    with contextlib.suppress(ValueError):  # nothing logged yet: no figure
        plot_runs({"finetune": metrics_path}, out_png, metric=metric, train_metric=train_metric)


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------


class Trainer:
    """One fine-tuning run: :meth:`__init__` builds it (settings, data, model, folder, state), :meth:`fit`
    runs the loop. `task` gives the loss and the metric (default: the config's, :func:`brn_cli.tasks.make_task`); `progress`
    receives the step count and a status line (main process only)."""

    def __init__(
        self,
        config: FinetuneConfig,
        *,
        held: contextlib.ExitStack,
        task: Any = None,
        progress: Progress | None = None,
    ) -> None:
        self.t_start = time.time()
        self.data_given = bool(config.data)  # on resume: the run's data at a new location
        config, resume_state = read_resume_state(config)
        self.config = self._settings(config, resume_state, held)
        self.task = task if task is not None else make_task(**task_options(self.config))
        self.progress = or_null(progress if self.runtime.is_main else None)
        self._build_data(resume_state)
        self._build_model(resume_state)
        self.runtime.agree(lambda: prepare_run_dir(self.config, resume_state is not None, held))
        self.run_dir = Path(self.config.output)
        self._build_state(resume_state)

    # ---- build -----------------------------------------------------------------------------------

    def _settings(self, config: FinetuneConfig, resume_state, held) -> FinetuneConfig:
        """Validate, find the device and rank; on resume, lock the folder and keep the global batch."""
        from brn_cli.data.samplers import parse_sampler

        validate(config)
        self.sampler_mode = parse_sampler(config.sampler)
        self.runtime = runtime = make_runtime(config)
        if resume_state is not None:  # one process at a time continues a run (rank 0 holds the lock)
            runtime.agree(lambda: held.enter_context(folder_lock(config.output, what="run folder")))
            saved_world = int(resume_state.get("world_size", 1))
            if saved_world != runtime.world_size:
                batch = per_process_batch(config, saved_world, runtime.world_size)
                config = dataclasses.replace(config, batch_size=batch)
                validate(config)
        if config.amp == "fp16" and not runtime.is_cuda and runtime.is_main:
            sys.stderr.write(
                "note: amp fp16 on a CPU runs, but is usually slower than fp32 there; it is meant for GPUs\n"
            )
        return config

    def _build_data(self, resume_state) -> None:
        from brn_cli.data.datasets import load_data
        from brn_cli.data.samplers import LabelBatchSampler

        config, runtime = self.config, self.runtime
        self.data = load_data(
            config.data, seed=config.seed, **data_options(config), **task_data_options(config)
        )
        self.fingerprint = data_fingerprint(self.data)
        if resume_state is not None:
            check_same_data(
                resume_state.get("data_fingerprint"),
                self.fingerprint,
                config.data,
                given=self.data_given,
                run_dir=Path(config.output),
                note=runtime.is_main,
            )
        self.sampler = LabelBatchSampler(
            self.data.train_labels,
            config.batch_size,
            self.sampler_mode,
            seed=config.seed,
            num_replicas=runtime.world_size,
            rank=runtime.rank,
        )
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * len(self.sampler)))
        self.val_loader = make_val_loader(self.data, runtime, config)

    def _build_model(self, resume_state) -> None:
        """The model (renorm layers in place, on the device, stats sync configured) and its optimizer."""
        import torch

        from brn_cli.data.datasets import fit_data_to_model
        from brn_cli.train.distributed import configure_stats_sync
        from brn_cli.train.schedule import (
            PeerWarmupNotContinued,
            RenormScheduler,
            parse_schedule,
            peer_warmup_note,
        )

        config, runtime = self.config, self.runtime
        source = str(Path(config.resume) / LAST) if resume_state is not None else config.checkpoint
        model, self.loaded, self.n_layers = load_model(config, source)
        # channels, classes and the task's shapes (and a user's loss) checked before anything is written
        fit_data_to_model(model, self.data, labels=isinstance(self.task, Classification))
        check_task_on_data(self.task, model, self.data)
        # What every save checks: entries finite now must stay finite (a model may keep, say, a -inf mask).
        self.finite_at_start = set(model.state_dict()) - set(nonfinite_tensors(model))
        model.to(runtime.device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        sync_report = configure_stats_sync(model, config.stats_sync, runtime.dist)
        if runtime.is_main and runtime.world_size > 1:
            sys.stderr.write(
                f"distributed: {runtime.world_size} processes ({runtime.dist.backend}), stats_sync "
                f"{config.stats_sync}, global batch {config.batch_size * runtime.world_size}\n"
            )
            if sync_report.note():
                sys.stderr.write(f"note: {sync_report.note()}\n")
        self.model = model
        self.optimizer = make_optimizer(model, config)
        dmax_spec = config.dmax_schedule if config.dmax_schedule is not None else config.rmax_schedule
        # renorm.step counts applied optimizer updates (its post-hook): lr, rmax and dmax all follow it
        self.renorm = RenormScheduler(
            model,
            parse_schedule(config.rmax_schedule, kind="rmax", total_steps=self.total_steps),
            parse_schedule(dmax_spec, kind="dmax", total_steps=self.total_steps),
            optimizer=self.optimizer,
        )
        note = peer_warmup_note(
            self.loaded.peer_schedule, config.rmax_schedule, dmax_spec, source=Path(source).name
        )
        if note and runtime.is_main and resume_state is None:
            warnings.warn(note, PeerWarmupNotContinued, stacklevel=2)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
        self.forward = runtime.wrap(torch.compile(model) if config.compile else model)

    def _build_state(self, resume_state) -> None:
        """The TrainState, fresh (seeded) or restored from last.pt; the run's files."""
        import torch

        config, runtime, total = self.config, self.runtime, self.total_steps
        renorm = self.renorm
        self.state = TrainState(
            total_steps=total,
            optimizer=self.optimizer,
            lr_schedule=LRSchedule(config.lr_schedule, config.lr, config.warmup_steps, total),
            renorm=renorm,
            scaler=torch.amp.GradScaler(runtime.device.type) if config.amp == "fp16" else None,
            rng=RngState(cuda=runtime.is_cuda),
            window=MetricWindow(runtime.device),
            config=config.to_dict(),
            world_size=runtime.world_size,
            data_fingerprint=self.fingerprint,
        )
        record = {**config.to_dict(), "data_fingerprint": self.fingerprint}
        self.files = RunFiles(self.run_dir, record, enabled=runtime.is_main, started=resume_state is not None)
        self.eval_pending = False  # last.pt was saved before the validation of its step, still to come
        self.resumed_from = None
        if resume_state is None:
            RngState.seed(config.seed)
        else:
            self.state.load_state_dict(resume_state)
            self.resumed_from = self.state.step
            self.eval_pending = bool(resume_state.get("eval_pending")) and self.val_loader is not None
            if runtime.is_main:
                truncate_metrics(self.files.metrics_path, self.state.step, eval_pending=self.eval_pending)
        renorm.apply()
        self.saved_at: dict[str, int] = {}
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.folded_at = self.state.step  # the step of the last fold (its loss sums were finite)
        self.info = ""

    # ---- the loop ----------------------------------------------------------------------------------

    def fit(self) -> FinetuneResult:
        """Train to total_steps (or a signal): fetch, forward, loss, backward, step, log, save, validate."""
        from brn_cli.train.distributed import peer_failures

        state, config, total = self.state, self.config, self.total_steps
        with (
            self.reporting(),
            StopRequest() as stop,
            peer_failures(self.runtime.dist, self.last_checkpoint),
            contextlib.closing(self.batches(stop)) as batches,
        ):
            if self.eval_pending:  # last.pt was saved before the validation of its step: do it now
                self.validate()
            for x, y in batches:
                self.train_step(x, y)  # forward, loss, backward, optimizer step (the schedules follow it)
                if state.step % config.log_every == 0 or state.step == total:
                    self.log_train()
                stopping = self.stop_requested(stop) or state.step >= total
                eval_due = self.val_loader is not None and (
                    self.due(config.eval_every) or state.step == total
                )
                if self.due(config.save_every) or stopping:
                    # Saved before validating: a failed validation loses no training (resume redoes it).
                    # The unsynced device sums go into the window so that resume sees them.
                    self.fold_window()
                    self.save(LAST, pending=eval_due)
                if eval_due:
                    self.validate()
                    if state.step >= total:  # the finished run's last.pt knows its final validation
                        self.save(LAST)
                if stopping:
                    break
        return self.finish(stop)

    def due(self, every: int) -> bool:
        """Whether this step is one of every `every` steps (0: never)."""
        return bool(every) and self.state.step % every == 0

    @contextlib.contextmanager
    def reporting(self):
        """The progress task of this run, stopped however the loop ends."""
        self.progress.start("finetune", self.total_steps, self.state.step)
        try:
            yield
        finally:
            self.progress.stop()

    def batches(self, stop: StopRequest):
        """The batches from the saved position on, epoch after epoch, until the run ends or a signal."""
        while self.state.step < self.total_steps and stop.signum is None:
            yield from self.epoch_batches()
            self.state.position.next_epoch()  # the epoch ran out: the next one from its first batch

    def epoch_batches(self):
        """The rest of the current epoch's batches, from the saved position."""
        from brn_cli.data.augment import AugmentedDataset

        position = self.state.position
        self.sampler.set_epoch(position.epoch)
        if isinstance(self.data.train, AugmentedDataset):  # before the loader: workers get a copy
            self.data.train.set_epoch(position.epoch)
        batches = list(self.sampler)[position.batch_index :]
        return make_loader(self.data.train, batches, self.runtime, self.config.num_workers)

    def train_step(self, x, y) -> None:
        """One optimizer step on one batch; the loss and metric sums stay on the device."""
        import torch

        state, device = self.state, self.runtime.device
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        self.lr = state.lr_schedule.apply(self.optimizer, state.renorm.step)
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            output = self.forward(x)
            self.task.check(output)
            loss = self.task.loss(output, y)
        self.optimizer.zero_grad(set_to_none=True)
        if state.scaler is not None:
            state.scaler.scale(loss).backward()
            state.scaler.step(self.optimizer)
            state.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        # renorm.step (updates) advanced inside optimizer.step, unless the scaler skipped it
        state.step += 1
        state.position.advance()
        state.window.add(loss, *self.task.batch_metric(output, y), examples=y.shape[0])
        self.progress.update(state.step, self.info)

    def stop_requested(self, stop: StopRequest) -> bool:
        """A signal on any rank stops every rank after this same step."""
        if self.runtime.world_size > 1:
            any_signal = int(self.runtime.dist.max(float(stop.signum or 0)))
            if any_signal and stop.signum is None:
                stop.signum = any_signal
        return stop.signum is not None

    # ---- log, validate, save -----------------------------------------------------------------------

    def fold_window(self) -> None:
        """Fold the device sums into the window; a non-finite loss stops the run with where to resume."""
        state = self.state
        loss_total = state.window.fold(self.runtime.dist)
        if not math.isfinite(loss_total):
            step, since = state.step, self.folded_at + 1
            where = f"at step {step}" if since >= step else f"between steps {since} and {step}"
            raise BrnError(
                f"training loss became {loss_total} {where}; {self.last_good()}; lower `lr` or relax the "
                "schedule more slowly"
            )
        self.folded_at = state.step

    def log_train(self) -> None:
        from brn_cli.nn.norms import collect_telemetry

        state = self.state
        self.fold_window()
        loss, metric = state.window.close()
        rmax, dmax = state.renorm.values()
        self.last_train = {
            "kind": "train",
            "step": state.step,
            "epoch": state.position.epoch,
            self.task.loss_name: loss,
            self.task.train_metric_name: metric,
            "lr": self.lr,
            "rmax": rmax,
            "dmax": dmax,
            "skipped_updates": state.step - state.renorm.step,
            **collect_telemetry(self.model),
        }
        self.files.log(self.last_train)
        self.show()

    def show(self) -> None:
        if self.last_train:
            self.info = progress_line(
                self.last_train, self.last_eval, self.task.metric_name, self.task.train_metric_name
            )
            self.progress.update(self.state.step, self.info)

    def run_eval(self) -> dict[str, Any]:
        from brn_cli.evaluation.evaluate import evaluate_state
        from brn_cli.train.distributed import average_batchnorm_buffers, stats_sync_suspended

        model, runtime, task = self.model, self.runtime, self.task
        average_batchnorm_buffers(model, runtime.dist)
        with stats_sync_suspended(model):  # shards differ in length: no collective inside a forward
            metric_state, _ = evaluate_state(
                model,
                self.val_loader,
                task,
                device=runtime.device,
                amp=self.config.amp,
                channels_last=self.config.channels_last,
            )
        model.train()
        # every rank's state summed (confusion matrices) or gathered (embeddings), then the metrics
        metrics = task.compute(task.reduce(metric_state, runtime.dist))
        return {"step": self.state.step, **{f"val_{k}": v for k, v in metrics.items()}}

    def validate(self) -> None:
        """Inference-mode validation of this step; a better one becomes best.pt."""
        state = self.state
        self.last_eval = {"kind": "eval", **self.run_eval()}
        self.files.log(self.last_eval)
        # Every rank decides (the metrics are all-reduced, so identically): save() is collective.
        key = f"val_{self.task.metric_name}"
        if not state.best or key not in state.best or self.last_eval[key] > state.best[key]:
            state.best = {k: v for k, v in self.last_eval.items() if k != "kind"}
            self.save(BEST)
        self.show()

    def last_good(self) -> str:
        """Where the run can be picked up after a failure (every save checked its weights first)."""
        last = self.run_dir / LAST
        if LAST in self.saved_at:
            return f"{last} (step {self.saved_at[LAST]}) is the last good checkpoint"
        if self.resumed_from is not None:
            return f"{last} (step {self.resumed_from}) is the last good checkpoint"
        return "no checkpoint was saved"

    def last_checkpoint(self) -> str | None:  # this run's (with force, an old run's last.pt may be there)
        return str(self.run_dir / LAST) if LAST in self.saved_at or self.resumed_from is not None else None

    def save(self, name: str, *, pending: bool = False) -> None:
        """Called by every rank: buffers must agree across ranks; rank 0 writes. Never writes a non-finite
        weight or statistic (every rank sees the same values, so every rank raises). `pending`: the
        validation of this step is still to come (a resumed run does it first)."""
        from brn_cli.data.specs import preprocessing_record
        from brn_cli.storage.checkpoint import make_brn_checkpoint, save_checkpoint_dict
        from brn_cli.train.distributed import average_batchnorm_buffers, check_buffers_equal

        model, runtime, config, step = self.model, self.runtime, self.config, self.state.step
        average_batchnorm_buffers(model, runtime.dist)
        check_buffers_equal(model, runtime.dist)
        broken = nonfinite_tensors(model, self.finite_at_start)
        if broken:
            more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
            raise BrnError(
                f"weights became non-finite by step {step} ({broken[0]}{more}), so {name} was not written; "
                f"{self.last_good()}; lower `lr` or relax the schedule more slowly"
            )
        if runtime.is_main:
            ckpt = make_brn_checkpoint(
                model,
                input_shape=[2, *self.data.sample_shape],
                command="finetune",
                **{
                    **self.loaded.lineage(),
                    "preprocessing": preprocessing_record(
                        config.normalize, config.image_size, config.resize_size
                    ),
                    "task": self.task.settings(),
                    "peer_schedule": None,  # a source's peer warm-up position: this run's schedule replaced it
                },
                training=self.state.state_dict(eval_pending=pending),
            )
            save_checkpoint_dict(ckpt, self.run_dir / name, force=True)
        self.saved_at[name] = step
        self.files.saved(name)

    # ---- wrap up -----------------------------------------------------------------------------------

    def finish(self, stop: StopRequest) -> FinetuneResult:
        """The last saves and the curves; FinetuneInterrupted after a signal, else the result."""
        from brn_cli.train.distributed import peer_failures, shutdown

        state, runtime, total = self.state, self.runtime, self.total_steps
        with peer_failures(runtime.dist, self.last_checkpoint):
            if self.saved_at.get(LAST) != state.step:  # a signal arrived between epochs
                self.save(LAST)
            if self.val_loader is None and state.step >= total:
                state.best = {"step": state.step, "note": "no validation data: best.pt is the final model"}
                self.save(BEST)
            runtime.dist.barrier()  # no rank leaves (and tears down the group) while another still saves
        if runtime.is_main:
            _plot_curves(
                self.files.metrics_path,
                self.run_dir / CURVES,
                self.task.metric_name,
                self.task.train_metric_name,
            )
        if runtime.world_size > 1:
            # The DDP wrapper holds the group and lives on in reference cycles until the garbage collector
            # runs: let it go first, so leaving the group ends gloo's threads before interpreter exit.
            self.forward = self.model
            shutdown(runtime.dist)
        if stop.signum is not None and state.step < total:
            name = signal.Signals(stop.signum).name
            raise FinetuneInterrupted(
                f"{name} at step {state.step}/{total}: saved {self.run_dir / LAST}; "
                f"continue with `resume={self.run_dir}`",
                stop.signum,
            )
        return self.result()

    def result(self) -> FinetuneResult:
        state, metric, train_metric = self.state, self.task.metric_name, self.task.train_metric_name
        rmax, dmax = state.renorm.values()
        final = {
            "step": state.step,
            "train_loss": self.last_train.get("loss"),
            f"train_{train_metric}": self.last_train.get(train_metric),
            "val_loss": self.last_eval.get("val_loss"),
            f"val_{metric}": self.last_eval.get(f"val_{metric}"),
            **{k: v for k, v in self.last_eval.items() if k.startswith("val_") and k != f"val_{metric}"},
            "rmax": rmax,
            "dmax": dmax,
            "skipped_updates": state.step - state.renorm.step,
            "renorm_layers": self.n_layers,
        }
        return FinetuneResult(
            run_dir=str(self.run_dir),
            steps=state.step,
            final=final,
            best=state.best,
            metrics_path=str(self.files.metrics_path),
            resumed_from=self.resumed_from,
            device=str(self.runtime.device),
            seconds=time.time() - self.t_start,
            files=sorted(p.name for p in self.run_dir.iterdir() if not p.name.startswith(".")),
            metric=metric,
        )
