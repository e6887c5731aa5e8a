"""Train a sample architecture with plain BatchNorm on i.i.d. batches: the "user's existing model".

Batch Renormalization is meant for models that already exist, trained with BatchNorm under the usual
i.i.d. minibatches. This module makes such a model from the bundled MNIST digits in seconds, so the demo,
the tests and the experiments start from a realistic checkpoint rather than a random one.

The loop is deliberately plain: uniformly shuffled minibatches (a fresh permutation each epoch), SGD with
Nesterov momentum, learning rate decayed linearly to zero, cross-entropy. Accuracy is measured in
inference mode (BatchNorm using its moving averages), which is what a user's deployed model does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from brn_cli.errors import BrnError
from brn_cli.progress import Progress, or_null
from brn_cli.samples import SAMPLE_DATA
from brn_cli.samples.models import SAMPLE_ARCHS

# Mean and standard deviation of the bundled training digits' pixels (in [0, 1]); standardising the
# input keeps the first conv's pre-activations near unit scale, so a fixed learning rate works for all archs.
PIXEL_MEAN = 0.1314
PIXEL_STD = 0.3087


@dataclass
class SampleData:
    """The bundled digits as float tensors, standardised: x in NCHW, y int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def load_sample_data(path: str | Path = SAMPLE_DATA, device: str | torch.device = "cpu") -> SampleData:
    """Load an npz with uint8 images `x_train`, `x_val` [N, 1, 28, 28] and labels; returns standardised floats."""
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_val", "y_val")}
    except (OSError, KeyError, ValueError) as exc:
        raise BrnError(f"cannot read sample data {path}: {exc}") from None

    def images(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a.astype(np.float32) / 255.0)
        return ((x - PIXEL_MEAN) / PIXEL_STD).to(device)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64)).to(device)

    return SampleData(
        images(arrays["x_train"]), labels(arrays["y_train"]), images(arrays["x_val"]), labels(arrays["y_val"])
    )


def build_sample_model(arch: str, **kwargs: Any) -> nn.Module:
    """A sample model by short name (``small_resnet``) or full spec (``brn_cli.samples.models:small_resnet``)."""
    name = arch.split(":", 1)[1] if arch.startswith("brn_cli.samples.models:") else arch
    factory = SAMPLE_ARCHS.get(name)
    if factory is None:
        raise BrnError(f"unknown sample arch {arch!r}; choose one of: {', '.join(SAMPLE_ARCHS)}")
    return factory(**kwargs)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` in inference mode; restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size])
            target = y[start : start + batch_size]
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
    finally:
        model.train(was_training)
    return correct / len(x), loss_sum / len(x)


def pretrain_batchnorm(
    arch: str,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 0.05,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    data: SampleData | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train sample `arch` with plain BatchNorm for `steps` optimizer steps on i.i.d. minibatches.

    Returns the model (in eval mode) and metrics: ``train_accuracy`` and ``val_accuracy`` (inference mode,
    whole splits), ``val_loss``, ``final_batch_loss``, ``seconds`` (training loop only), and the settings.
    Deterministic for a given `seed` on one device and thread count. `progress` hears of every 10th step
    and the last, with the batch loss.
    """
    _check_settings(steps, batch_size, lr)
    device = torch.device(device)
    data = data if data is not None else load_sample_data(device=device)
    n_train = len(data.x_train)
    if batch_size > n_train:
        raise BrnError(f"`batch_size` {batch_size} exceeds the {n_train} training examples")

    torch.manual_seed(seed)  # weight init
    model = build_sample_model(arch).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    # Linear decay to zero: the last steps average out minibatch noise in weights and BN statistics.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    gen = torch.Generator().manual_seed(seed)  # batch order, independent of the init above
    batches = _iid_batches(n_train, batch_size, gen, device)

    progress = or_null(progress)
    progress.start(f"pretrain {arch}", steps)
    start_time = time.perf_counter()
    try:
        loss = _train(model, optimizer, scheduler, data, batches, steps, progress)
    finally:
        progress.stop()
    seconds = time.perf_counter() - start_time
    if not torch.isfinite(loss):
        raise BrnError(f"pretraining diverged (loss {float(loss)}); lower `lr`")

    train_acc, _ = evaluate_accuracy(model, data.x_train, data.y_train)
    val_acc, val_loss = evaluate_accuracy(model, data.x_val, data.y_val)
    model.eval()
    metrics = {
        "arch": arch,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "device": str(device),
        "seconds": seconds,
        "final_batch_loss": float(loss.detach()),
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "val_loss": val_loss,
    }
    return model, metrics


def _check_settings(steps: int, batch_size: int, lr: float) -> None:
    if steps < 1:
        raise BrnError(f"`steps` must be at least 1, got {steps}")
    if batch_size < 2:
        raise BrnError(f"`batch_size` must be at least 2 (BatchNorm needs 2 samples), got {batch_size}")
    if not lr > 0:
        raise BrnError(f"`lr` must be positive, got {lr}")


def _iid_batches(
    n_train: int, batch_size: int, gen: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Index batches, endlessly: i.i.d. minibatches from a fresh uniform permutation per epoch, dropping
    the ragged tail."""
    while True:
        order = torch.randperm(n_train, generator=gen).to(device)
        for start in range(0, n_train - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: SampleData,
    batches: Iterator[torch.Tensor],
    steps: int,
    progress: Progress,
) -> torch.Tensor:
    """`steps` SGD steps of cross-entropy on the training split; returns the last batch's loss."""
    loss = torch.zeros(())
    for step in range(steps):
        idx = next(batches)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 10 == 9 or step == steps - 1:
            progress.update(step + 1, info=f"loss {float(loss.detach()):.3f}")
    return loss
