"""Re-estimate the population statistics of every norm layer exactly (no moving-average lag).

The moving averages mu, sigma of a network fine-tuned with a fast rate (alpha = 0.01) trail the weights:
they average statistics of models from the last few hundred steps. Calibration replaces them, for the
final weights, with exact averages over N batches::

    mu      = sum_i x_i / n                     per channel, over every example and spatial position
    var     = sum_i (x_i - mu)^2 / n            population (biased) variance
    running_mean <- mu,  running_var <- var     so inference uses sigma = sqrt(var + eps)

Sums are combined across batches in float64 with Chan's pairwise formula (per-batch mean and sum of
squared deviations), which avoids the cancellation of sum(x^2) - n mu^2.

Order matters: a layer's input depends on the statistics of the norm layers before it. Each layer is
therefore measured with every UPSTREAM norm already calibrated and the model in eval mode (dropout off,
norms using their running statistics: the inference function), one pass over the N batches per layer, in
the order the layers first run. A pass stops the forward right after the layer's input is captured
(a layer called more than once per forward gets full passes), so the cost is about L/2 forward passes per
batch for L layers rather than L. The loader must yield the same batches on every pass (brn's loaders do:
the sampler's order depends only on its seed and epoch); this is checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from brn_cli.errors import BrnError
from brn_cli.nn.norms import norm_layers
from brn_cli.progress import Progress, or_null

__all__ = [
    "LayerShift",
    "calibrate",
    "calibrate_data",
    "calibrate_inputs",
]


@dataclass
class LayerShift:
    """How calibration moved one layer's statistics.

    mean_shift: max over channels |new mu - old mu|; sigma_ratio: max over channels new sigma / old sigma
    (min_sigma_ratio: the min), with sigma = sqrt(running_var + eps).
    """

    name: str
    mean_shift: float
    sigma_ratio: float
    min_sigma_ratio: float = 1.0
    channels: int = 0
    examples: int = 0  # examples seen (each counted once per call of the layer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StopForward(Exception):
    """Raised inside a forward pre-hook once the input of the layer being measured is captured."""


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in float64."""

    def __init__(self) -> None:
        self.n = 0  # values per channel: examples x positions
        self.examples = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise BrnError(
                f"a norm layer got input of shape {list(x.shape)}; expected [batch, channels, ...]"
            )
        self.examples += int(x.shape[0])
        xd = x.detach().to(torch.float64)
        dims = [0, *range(2, xd.dim())]
        nb = xd.numel() // xd.shape[1]
        mean_b = xd.mean(dims)
        m2_b = ((xd - mean_b.view(1, -1, *([1] * (xd.dim() - 2)))) ** 2).sum(dims)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.n * nb / n)
        self.n = n

    def result(self) -> tuple[Tensor, Tensor]:
        assert self.mean is not None and self.m2 is not None
        return self.mean, self.m2 / self.n


def _batches(loader: Iterable, num_batches: int) -> Iterable[Tensor]:
    for i, batch in enumerate(loader):
        if i >= num_batches:
            return
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def calibrate(
    model: nn.Module,
    loader: Iterable,
    *,
    num_batches: int,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> list[LayerShift]:
    """Set running_mean / running_var of every norm layer to exact statistics over `num_batches` batches.

    See the module docstring for the order and the math. The model is moved to `device`, run under
    no_grad in eval mode, and returned to its training flags. Returns one :class:`LayerShift` per
    calibrated layer, in calibration order. Layers that never run on this data are left as they were.
    `progress` hears of each batch of each layer's pass.
    """
    if num_batches < 1:
        raise BrnError(f"`num_batches` must be >= 1, got {num_batches}")
    dev = torch.device(device)
    model.to(dev)
    layers = norm_layers(model)
    if not layers:
        raise BrnError("the model has no BatchNorm or Batch Renorm layers with running statistics")
    name_of = {id(m): n for n, m in layers}
    flags = {m: m.training for m in model.modules()}
    model.eval()
    progress = or_null(progress)
    try:
        with torch.no_grad():
            run = _probe_layer_order(model, [m for _, m in layers], _batches(loader, num_batches), dev)
            shifts: list[LayerShift] = []
            progress.start("calibrate", len(run.order) * len(run.fingerprints))
            try:
                for index, module in enumerate(run.order):
                    batches = _same_batches(_batches(loader, num_batches), run.fingerprints)
                    moments = _measure_inputs(
                        model,
                        module,
                        batches,
                        dev,
                        stop_early=run.calls[module] == 1,
                        progress=progress,
                        done=index * len(run.fingerprints),
                    )
                    shifts.append(_apply(name_of[id(module)], module, moments))
            finally:
                progress.stop()
    finally:
        for m, flag in flags.items():
            m.train(flag)
    return shifts


@dataclass
class _LayerOrder:
    """What one forward pass tells about the norm layers: the order in which they first run, how often
    each runs per forward, and a fingerprint of every batch (to check later passes see the same data)."""

    order: list[nn.Module]
    calls: dict[nn.Module, int]
    fingerprints: list[float]


def _fingerprint(x: Tensor) -> float:
    return float(x.double().sum())


def _probe_layer_order(
    model: nn.Module, layers: list[nn.Module], batches: Iterable[Tensor], dev: torch.device
) -> _LayerOrder:
    """Run the first batch once with a hook on every layer; fingerprint every batch."""
    run = _LayerOrder(order=[], calls={}, fingerprints=[])

    def probe(module: nn.Module, _args: Any) -> None:
        if module not in run.calls:
            run.order.append(module)
        run.calls[module] = run.calls.get(module, 0) + 1

    handles = [m.register_forward_pre_hook(probe) for m in layers]
    try:
        for x in batches:
            run.fingerprints.append(_fingerprint(x))
            if len(run.fingerprints) == 1:
                model(x.to(dev))
    finally:
        for h in handles:
            h.remove()
    if not run.fingerprints:
        raise BrnError("no batches to calibrate on: the data is empty")
    if not run.order:
        raise BrnError("no norm layer ran on this data")
    return run


def _same_batches(batches: Iterable[Tensor], fingerprints: list[float]) -> Iterable[Tensor]:
    """The batches of a later pass, checked against the probe pass's fingerprints."""
    for i, x in enumerate(batches):
        if i >= len(fingerprints) or _fingerprint(x) != fingerprints[i]:
            raise BrnError(
                "the data loader gave different batches on a second pass; calibration "
                "needs a deterministic loader"
            )
        yield x


def _measure_inputs(
    model: nn.Module,
    module: nn.Module,
    batches: Iterable[Tensor],
    dev: torch.device,
    *,
    stop_early: bool,
    progress: Progress,
    done: int,
) -> _Moments:
    """The moments of `module`'s input over `batches`. With `stop_early` (the layer runs once per
    forward) each forward stops as soon as the input is captured: the layers after it need not run.
    `progress` counts on from `done` batches, one per batch."""
    moments = _Moments()

    def capture(_module: nn.Module, args: Any) -> None:
        moments.add(args[0])
        if stop_early:
            raise _StopForward

    handle = module.register_forward_pre_hook(capture)
    try:
        for i, x in enumerate(batches, start=1):
            try:
                model(x.to(dev))
            except _StopForward:
                pass
            progress.update(done + i)
    finally:
        handle.remove()
    return moments


def _apply(name: str, module: nn.Module, moments: _Moments) -> LayerShift:
    """Write the measured statistics into `module` and report the change."""
    mean, var = moments.result()
    eps = float(module.eps)
    old_mean = module.running_mean.detach().to(torch.float64)
    old_sigma = torch.sqrt(module.running_var.detach().to(torch.float64) + eps)
    new_sigma = torch.sqrt(var + eps)
    module.running_mean.copy_(mean.to(module.running_mean.dtype))
    module.running_var.copy_(var.to(module.running_var.dtype))
    ratio = new_sigma / old_sigma
    return LayerShift(
        name=name,
        mean_shift=float((mean - old_mean).abs().max()),
        sigma_ratio=float(ratio.max()),
        min_sigma_ratio=float(ratio.min()),
        channels=int(mean.numel()),
        examples=moments.examples,
    )


def calibrate_data(
    model: nn.Module,
    bundle: Any,
    *,
    num_batches: int,
    batch_size: int = 64,
    split: str = "train",
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> tuple[list[LayerShift], int]:
    """Calibrate on `num_batches` i.i.d. batches of a DataBundle's train (or val) split.

    Returns (shifts, batches used): when the split holds fewer full batches, all of them are used. The data
    is first checked against the model (:func:`~brn_cli.data.datasets.fit_data_to_model`). Targets are never used:
    a bundle of inputs only (``load_data(..., inputs_only=True)``) serves, whatever the task.
    """
    from brn_cli.data.datasets import fit_data_to_model
    from brn_cli.data.samplers import LabelBatchSampler, make_loader

    if split not in ("train", "val"):
        raise BrnError(f"`split` must be train or val, got {split!r}")
    dataset, labels = (
        (bundle.train, bundle.train_labels) if split == "train" else (bundle.val, bundle.val_labels)
    )
    if dataset is None:
        raise BrnError(
            "the data has no validation split: add x_val/y_val, a val/ folder, or pass `val_split`"
        )
    if num_batches < 1:
        raise BrnError(f"`num_batches` must be >= 1, got {num_batches}")
    fit_data_to_model(model, bundle, split=split, labels=False)
    sampler = LabelBatchSampler(labels, batch_size, "iid", seed=seed)  # same batches on every pass
    used = min(num_batches, len(sampler))
    shifts = calibrate(
        model, make_loader(dataset, sampler), num_batches=used, device=device, progress=progress
    )
    return shifts, used


def calibrate_inputs(
    model: nn.Module,
    inputs: Iterable,
    *,
    num_batches: int | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> list[LayerShift]:
    """:func:`calibrate` from any iterable of model inputs, shuffling loaders included; no labels needed.

    Each item is an input tensor or a tuple/list whose first element is (``(x, y)`` from a DataLoader; the
    rest is ignored). The first `num_batches` items (default: all) are read once and held in memory, so
    every pass sees the same batches whatever order the loader draws them in. `device` defaults to the
    device of the model's parameters. Returns one :class:`LayerShift` per calibrated layer.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from brn_cli import BatchRenorm1d, calibrate
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), BatchRenorm1d(4))
        >>> data = TensorDataset(torch.randn(64, 3), torch.zeros(64))
        >>> shifts = calibrate(model, DataLoader(data, batch_size=16, shuffle=True), num_batches=4)
        >>> [s.name for s in shifts], shifts[0].examples
        (['1'], 64)
    """
    if num_batches is not None and num_batches < 1:
        raise BrnError(f"`num_batches` must be >= 1, got {num_batches}", param="num_batches")
    held = []
    for item in inputs:
        if num_batches is not None and len(held) >= num_batches:
            break
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        if not isinstance(x, Tensor):
            raise BrnError(
                f"calibration input {len(held)} is a {type(x).__name__}; expected a tensor or (tensor, ...)",
                param="inputs",
            )
        held.append(x.detach())
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else "cpu"
    return calibrate(model, held, num_batches=max(len(held), 1), device=device, progress=progress)
