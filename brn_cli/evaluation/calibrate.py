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
from brn_cli.evaluation.evaluate import progress_bar
from brn_cli.nn.norms import norm_layers

__all__ = [
    "LayerShift",
    "calibrate",
    "calibrate_data",
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
    progress: bool = False,
) -> list[LayerShift]:
    """Set running_mean / running_var of every norm layer to exact statistics over `num_batches` batches.

    See the module docstring for the order and the math. The model is moved to `device`, run under
    no_grad in eval mode, and returned to its training flags. Returns one :class:`LayerShift` per
    calibrated layer, in calibration order. Layers that never run on this data are left as they were.
    """
    if num_batches < 1:
        raise BrnError(f"--batches must be >= 1, got {num_batches}")
    dev = torch.device(device)
    model.to(dev)
    layers = norm_layers(model)
    if not layers:
        raise BrnError("the model has no BatchNorm or Batch Renorm layers with running statistics")
    name_of = {id(m): n for n, m in layers}
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            # Probe pass: the order in which layers first run, and how often each runs per forward.
            order: list[nn.Module] = []
            calls: dict[int, int] = {}

            def probe(module: nn.Module, _args: Any) -> None:
                if id(module) not in calls:
                    order.append(module)
                calls[id(module)] = calls.get(id(module), 0) + 1

            handles = [m.register_forward_pre_hook(probe) for _, m in layers]
            try:
                fingerprints = []
                for x in _batches(loader, num_batches):
                    fingerprints.append(float(x.double().sum()))
                    if len(fingerprints) == 1:
                        model(x.to(dev))
            finally:
                for h in handles:
                    h.remove()
            if not fingerprints:
                raise BrnError("no batches to calibrate on: the data is empty")
            if not order:
                raise BrnError("no norm layer ran on this data")

            shifts: list[LayerShift] = []
            with progress_bar(progress) as bar:
                task = (
                    bar.add_task("calibrate", total=len(order) * len(fingerprints))
                    if bar is not None
                    else None
                )
                for module in order:
                    moments = _Moments()
                    stop_early = calls[id(module)] == 1

                    def capture(_module: nn.Module, args: Any, moments=moments, stop=stop_early) -> None:
                        moments.add(args[0])
                        if stop:
                            raise _StopForward

                    handle = module.register_forward_pre_hook(capture)
                    try:
                        for i, x in enumerate(_batches(loader, num_batches)):
                            if i >= len(fingerprints) or float(x.double().sum()) != fingerprints[i]:
                                raise BrnError(
                                    "the data loader gave different batches on a second pass; calibration "
                                    "needs a deterministic loader"
                                )
                            try:
                                model(x.to(dev))
                            except _StopForward:
                                pass
                            if bar is not None:
                                bar.advance(task)
                    finally:
                        handle.remove()
                    shifts.append(_apply(name_of[id(module)], module, moments))
    finally:
        for m, flag in flags.items():
            m.train(flag)
    return shifts


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
    progress: bool = False,
) -> tuple[list[LayerShift], int]:
    """Calibrate on `num_batches` i.i.d. batches of a DataBundle's train (or val) split.

    Returns (shifts, batches used): when the split holds fewer full batches, all of them are used. The data
    is first checked against the model (:func:`~brn_cli.data.datasets.fit_data_to_model`; labels are not used here).
    """
    from brn_cli.data.datasets import fit_data_to_model
    from brn_cli.data.samplers import LabelBatchSampler, make_loader

    if split not in ("train", "val"):
        raise BrnError(f"--split must be train or val, got {split!r}")
    dataset, labels = (
        (bundle.train, bundle.train_labels) if split == "train" else (bundle.val, bundle.val_labels)
    )
    if dataset is None:
        raise BrnError(
            "the data has no validation split: add x_val/y_val, a val/ folder, or pass --val-split"
        )
    if num_batches < 1:
        raise BrnError(f"--batches must be >= 1, got {num_batches}")
    fit_data_to_model(model, bundle, split=split, labels=False)
    sampler = LabelBatchSampler(labels, batch_size, "iid", seed=seed)  # same batches on every pass
    used = min(num_batches, len(sampler))
    shifts = calibrate(
        model, make_loader(dataset, sampler), num_batches=used, device=device, progress=progress
    )
    return shifts, used
