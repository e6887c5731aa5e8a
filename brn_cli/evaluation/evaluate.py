"""A task's loss and metrics in inference mode, and with minibatch statistics (the train/inference gap).

The task (:mod:`brn_cli.tasks`; classification by default: cross-entropy and accuracy) says what the
outputs mean; its metrics are accumulated over the whole split (a confusion matrix, every embedding).

Inference mode is ``model.eval()``: every norm layer normalizes with its moving averages,
``y = gamma (x - mu) / sigma + beta``, a deterministic function of each example alone.

Batch-statistics mode is the paper's "training mode" evaluation (section 4.3): dropout and the rest stay
in eval mode, but every BatchNorm / Batch Renorm layer normalizes with the minibatch's own mu_B, sigma_B
(renorm layers with rmax = 1, dmax = 0, i.e. plain batchnorm, over the whole batch). A model trained with
batchnorm on non-i.i.d. batches can score much better here than in inference mode, because it learned to
rely on what the other examples of a batch look like; with Batch Renorm the two modes agree. Running
statistics are snapshotted before and restored exactly after, so evaluating never changes the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from brn_cli.errors import BrnError
from brn_cli.nn.norms import is_renorm, norm_layers
from brn_cli.progress import Progress, or_null
from brn_cli.tasks import Classification
from brn_cli.tasks.base import Task

__all__ = [
    "EvalResult",
    "batch_statistics_mode",
    "default_batch_size",
    "evaluate",
    "evaluate_data",
    "evaluate_state",
]


@dataclass
class EvalResult:
    """The task's mean loss and metrics over the data. `metric` is the primary one (`metric_name`: accuracy,
    mean_iou, recall@1, ...), `metrics` all of them (per-class lists included); `accuracy` is the top-1
    accuracy (a fraction in [0, 1]) for classification, else None."""

    loss: float
    accuracy: float | None
    examples: int
    mode: str  # "inference" or "batch-stats"
    batches: int = 0
    metric_name: str = "accuracy"
    metric: float | None = None
    metrics: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def batch_statistics_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Model in eval mode except that norm layers normalize with minibatch statistics.

    Renorm layers get rmax = 1, dmax = 0 and no microbatch (plain batchnorm over the batch). Every buffer
    of the norm layers (running_mean, running_var, num_batches_tracked, telemetry) and every changed
    attribute and training flag is restored exactly on exit, even on error.
    """
    flags = {m: m.training for m in model.modules()}
    saved: list[tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]] = []
    try:
        model.eval()
        for _, module in norm_layers(model, with_stats=False):
            buffers = {n: b.detach().clone() for n, b in module.named_buffers(recurse=False) if b is not None}
            attrs: dict[str, Any] = {}
            if is_renorm(module):
                attrs = {"rmax": module.rmax, "dmax": module.dmax, "microbatch": module.microbatch}
                module.rmax, module.dmax, module.microbatch = 1.0, 0.0, None
            saved.append((module, buffers, attrs))
            module.train()
        yield model
    finally:
        with torch.no_grad():
            for module, buffers, attrs in saved:
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)
                for name, value in attrs.items():
                    setattr(module, name, value)
        for module, flag in flags.items():
            module.train(flag)


def _autocast(device: torch.device, amp: str):
    if amp in ("off", "", None):
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise BrnError(f"`amp` must be off, bf16 or fp16, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=dtypes[amp])


def evaluate_state(
    model: nn.Module,
    loader: Iterable,
    task: Task | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_stats: bool = False,
    amp: str = "off",
    channels_last: bool = False,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], int]:
    """The task's metric state over the (x, target) batches of `loader` (see :func:`evaluate`) and the
    number of batches; for several processes, reduce the states (``task.reduce``) before ``task.compute``."""
    task = task if task is not None else Classification()
    dev = torch.device(device)
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    state, batches = task.metric_state(), 0
    mode = "batch-stats" if batch_stats else "inference"
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    flags = {m: m.training for m in model.modules()}
    ctx = batch_statistics_mode(model) if batch_stats else contextlib.nullcontext(model)
    progress = or_null(progress)
    progress.start(f"evaluate ({mode})", total)
    try:
        if not batch_stats:
            model.eval()
        with ctx, torch.no_grad():
            for x, y in loader:
                x = x.to(dev, non_blocking=True)
                y = torch.as_tensor(y).to(dev, non_blocking=True)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(dev, amp):
                    output = _forward(model, x)
                task.check(output, y)
                task.update(state, output, y)
                batches += 1
                progress.update(batches)
    finally:
        progress.stop()
        for module, flag in flags.items():
            module.train(flag)
    return state, batches


def _forward(model: nn.Module, x: torch.Tensor) -> Any:
    try:
        return model(x)
    except ValueError as exc:
        if "Expected more than 1 value per channel" in str(exc):
            raise BrnError(
                f"a batch of {len(x)} is too small for minibatch statistics; use a larger `batch_size`"
            ) from None
        raise


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    task: Task | None = None,
    device: str | torch.device = "cpu",
    batch_stats: bool = False,
    amp: str = "off",
    channels_last: bool = False,
    progress: Progress | None = None,
) -> EvalResult:
    """The task's mean loss and metrics of `model` over the (x, target) batches of `loader` (default task:
    classification, cross-entropy and top-1 accuracy).

    Inference mode (``model.eval()``) by default; ``batch_stats=True`` normalizes with each minibatch's
    statistics instead (see :func:`batch_statistics_mode`), running statistics left untouched. The model is
    moved to `device`; its training flags are restored afterwards. No gradients. `progress` hears of
    each batch.
    """
    task = task if task is not None else Classification()
    state, batches = evaluate_state(
        model,
        loader,
        task,
        device=device,
        batch_stats=batch_stats,
        amp=amp,
        channels_last=channels_last,
        progress=progress,
    )
    metrics = task.compute(state)
    return EvalResult(
        loss=metrics["loss"],
        accuracy=metrics["accuracy"] if isinstance(task, Classification) else None,
        examples=int(state["count"]),
        mode="batch-stats" if batch_stats else "inference",
        batches=batches,
        metric_name=task.metric_name,
        metric=metrics.get(task.metric_name),
        metrics={k: v for k, v in metrics.items() if k != "loss"},
    )


DEFAULT_BATCH = 256


def default_batch_size(labels: torch.Tensor, sampler: str = "iid") -> int:
    """The batch for evaluating data with these labels when none is given: 256 for iid (every example when
    there are fewer); for grouped:K, K times the number of labels a batch can hold, min(256 // K, labels
    present), at least one (so 160 for grouped:16 on 10 classes), the largest batch the sampler can form."""
    from brn_cli.data.samplers import parse_sampler

    mode = parse_sampler(sampler)
    if not mode.startswith("grouped:"):
        return max(1, min(DEFAULT_BATCH, len(labels)))
    k = int(mode.split(":")[1])
    present = (
        int((torch.bincount(torch.as_tensor(labels, dtype=torch.int64)) > 0).sum()) if len(labels) else 0
    )
    return k * max(1, min(DEFAULT_BATCH // k, present))


def evaluate_data(
    model: nn.Module,
    bundle: Any,
    *,
    batch_size: int | None = None,
    batch_stats: bool = False,
    sampler: str = "iid",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    task: Task | None = None,
) -> dict[str, Any]:
    """Evaluate on a DataBundle's validation split: inference mode, plus batch-stats mode when asked.

    Inference mode visits every validation example once. Batch-statistics batches are built like training
    batches (`sampler`: iid or grouped:K, full batches only, since a short batch would give noisier
    statistics), as the paper evaluated with test minibatches composed like the training ones.
    `batch_size` None: :func:`default_batch_size` for the validation labels and `sampler`. Before either
    pass, :func:`~brn_cli.data.datasets.fit_data_to_model` checks the data against the model (channels, classes).
    `task` (default classification) gives the loss and the metrics. Returns {"inference": EvalResult dict,
    "batch_stats": EvalResult dict | None, "metric": the task's primary metric, "gap": that metric,
    batch-stats minus inference | None}.
    """
    from brn_cli.data.datasets import fit_data_to_model
    from brn_cli.data.samplers import LabelBatchSampler, eval_loader, make_loader, parse_sampler

    if bundle.val is None:
        raise BrnError(
            "the data has no validation split: add x_val/y_val, a val/ folder, or pass `val_split`"
        )
    sampler = parse_sampler(sampler)
    if batch_size is None:
        batch_size = default_batch_size(bundle.val_labels, sampler)
    task = task if task is not None else Classification()
    fit_data_to_model(model, bundle, split="val", labels=type(task) is Classification)
    batch_sampler = None
    if batch_stats:  # check the batch composition before the (longer) inference pass
        batch_sampler = LabelBatchSampler(bundle.val_labels, batch_size, sampler, seed=seed)
    loader = eval_loader(bundle.val, batch_size)
    inference = evaluate(model, loader, task=task, device=device, progress=progress)
    result: dict[str, Any] = {
        "task": task.name,
        "metric": task.metric_name,
        "inference": inference.to_dict(),
        "batch_stats": None,
        "gap": None,
    }
    if batch_sampler is not None:
        loader = make_loader(bundle.val, batch_sampler)
        stats = evaluate(model, loader, task=task, device=device, batch_stats=True, progress=progress)
        result["batch_stats"] = {**stats.to_dict(), "sampler": sampler, "batch_size": batch_size}
        result["gap"] = stats.metric - inference.metric
    return result
