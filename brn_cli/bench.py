"""Side-by-side speed measurements (no timed tests: these return ratios for scripts to print).

Shared machines are noisy, so every measurement here interleaves the contenders inside one loop (the
order alternates each repetition), warms up first, and reports medians: a slow moment hits both sides,
and the ratio of medians is what is compared against a target.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["LAYER_TARGETS", "bench_layer", "interleaved_medians", "interleaved_times", "paired_ratio"]

# Issue 2's targets: BatchRenorm2d / nn.BatchNorm2d time ratios.
LAYER_TARGETS = {"train": 1.10, "eval": 1.02}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: dict[str, Callable[[], Any]], *, reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function, one entry per round, timed in interleaved rounds.

    Each round runs every function once; the order reverses on odd rounds so neither side always runs
    right after the other (caches, clock boosts). `warmup` untimed rounds come first.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + reps):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], *, reps: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function (see :func:`interleaved_times`)."""
    times = interleaved_times(fns, reps=reps, warmup=warmup, device=device)
    return {n: statistics.median(v) for n, v in times.items()}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator_i / denominator_i.

    The two calls of a round run back to back, so a burst of load from other processes hits both; the
    per-round ratio cancels it where a ratio of separate medians would not.
    """
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def bench_layer(
    shape: Sequence[int] = (32, 64, 56, 56),
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    device: str | torch.device = "cpu",
    reps: int = 30,
    warmup: int = 5,
    rmax: float = 3.0,
    dmax: float = 5.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Time nn.BatchNorm vs BatchRenorm on one input: training forward+backward and eval forward.

    The renorm layer runs with `rmax`/`dmax` > their BatchNorm values and moving averages that differ
    from the batch statistics, so r and d are computed, clipped and live in every step (the defaults
    3 and 5 are the paper's final limits). Returns median times in milliseconds, the ratios
    renorm/batchnorm (median of per-round ratios, see :func:`paired_ratio`), the targets, pass/fail, and
    the settings measured (thread count included).
    """
    from .layer import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

    dev = torch.device(device)
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3, 4, 5):
        raise ValueError(f"shape must have 2 to 5 dimensions, got {list(shape)}")
    c = shape[1]
    bn_cls, brn_cls = {
        2: (nn.BatchNorm1d, BatchRenorm1d),
        3: (nn.BatchNorm1d, BatchRenorm1d),
        4: (nn.BatchNorm2d, BatchRenorm2d),
        5: (nn.BatchNorm3d, BatchRenorm3d),
    }[len(shape)]
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) * 2.0 + 0.5).to(device=dev, dtype=dtype)
    if channels_last and len(shape) in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    grad = (
        torch.randn(*shape, generator=gen)
        .to(device=dev, dtype=dtype)
        .contiguous(
            memory_format=torch.channels_last
            if channels_last and len(shape) == 4
            else (torch.channels_last_3d if channels_last and len(shape) == 5 else torch.contiguous_format)
        )
    )
    # A small momentum (cost-neutral) keeps the moving averages far from the batch for hundreds of steps.
    bn = bn_cls(c, momentum=1e-4).to(device=dev, dtype=dtype)
    brn = brn_cls(c, momentum=1e-4, rmax=rmax, dmax=dmax).to(device=dev, dtype=dtype)
    with torch.no_grad():
        # Half the channels get moving averages far from the batch statistics (mean 0.5, std 2), so their
        # r and d stay clipped through every repetition; the other half match the batch and do not clip.
        far = torch.arange(c) % 2 == 0
        for layer in (bn, brn):
            layer.running_mean.copy_(torch.where(far, torch.tensor(50.0), torch.tensor(0.5)))
            layer.running_var.copy_(torch.where(far, torch.tensor(1e-4), torch.tensor(4.0)))
    x_train = x.detach().requires_grad_(True)

    def train_step(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.train()
            x_train.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x_train).backward(grad)

        return run

    def eval_step(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.eval()
            with torch.no_grad():
                layer(x)

        return run

    train_t = interleaved_times(
        {"batchnorm": train_step(bn), "renorm": train_step(brn)}, reps=reps, warmup=warmup, device=dev
    )
    eval_t = interleaved_times(
        {"batchnorm": eval_step(bn), "renorm": eval_step(brn)}, reps=reps, warmup=warmup, device=dev
    )
    train = {k: statistics.median(v) for k, v in train_t.items()}
    evals = {k: statistics.median(v) for k, v in eval_t.items()}
    telemetry = brn.last_telemetry()
    ratios = {
        "train": paired_ratio(train_t["renorm"], train_t["batchnorm"]),
        "eval": paired_ratio(eval_t["renorm"], eval_t["batchnorm"]),
    }
    return {
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "channels_last": bool(channels_last),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "reps": reps,
        "warmup": warmup,
        "rmax": rmax,
        "dmax": dmax,
        "r_clip_frac": telemetry.r_clip_frac if telemetry else None,
        "d_clip_frac": telemetry.d_clip_frac if telemetry else None,
        "ms": {
            "train_batchnorm": train["batchnorm"] * 1e3,
            "train_renorm": train["renorm"] * 1e3,
            "eval_batchnorm": evals["batchnorm"] * 1e3,
            "eval_renorm": evals["renorm"] * 1e3,
        },
        "ratio": ratios,
        "target": dict(LAYER_TARGETS),
        "pass": {k: ratios[k] <= LAYER_TARGETS[k] for k in ratios},
    }
