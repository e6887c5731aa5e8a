"""Side-by-side speed measurements (no timed tests: these return ratios for scripts to print).

Shared machines are noisy, so every measurement here interleaves the contenders inside one loop (the
order alternates each repetition), warms up first, and reports medians: a slow moment hits both sides,
and the ratio of medians is what is compared against a target.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from brn_cli.errors import BrnError

__all__ = ["LAYER_TARGETS", "bench_layer", "interleaved_medians", "interleaved_times", "paired_ratio"]

# The layer's speed targets: BatchRenorm2d / nn.BatchNorm2d time ratios.
LAYER_TARGETS = {"train": 1.10, "eval": 1.02}


def layer_steps(
    layer: nn.Module, x: torch.Tensor, grad: torch.Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Two closures to time: one training forward + backward of `layer` on `x` (upstream gradient `grad`),
    and one eval forward."""
    x_train = x.detach().requires_grad_(True)

    def train() -> None:
        layer.train()
        x_train.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x_train).backward(grad)

    def evaluate() -> None:
        layer.eval()
        with torch.no_grad():
            layer(x)

    return train, evaluate


def interleaved_times(
    fns: dict[str, Callable[[], Any]], *, reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function, one entry per round, timed in interleaved rounds.

    Each round runs every function once; the order reverses on odd rounds so neither side always runs
    right after the other (caches, clock boosts). `warmup` untimed rounds come first. On a CUDA device
    each call is timed by CUDA events recorded on the current stream around it.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    clock = _cuda_event_clock if device.type == "cuda" else _host_clock
    for i in range(warmup + reps):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            seconds = clock(fns[name], device)
            if i >= warmup:
                times[name].append(seconds)
    return times


def _host_clock(fn: Callable[[], Any], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cuda_event_clock(fn: Callable[[], Any], device: torch.device) -> float:
    """GPU time between two CUDA events around `fn` (its kernels, not the host's launch overhead alone),
    on an idle device: synchronized before, and after to read the events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1000.0


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
    dev = torch.device(device)
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3, 4, 5):
        raise ValueError(f"shape must have 2 to 5 dimensions, got {list(shape)}")
    x, grad = _layer_input_and_grad(shape, dtype=dtype, channels_last=channels_last, device=dev, seed=seed)
    bn, brn = _clipping_layer_pair(shape, rmax=rmax, dmax=dmax, dtype=dtype, device=dev)
    steps = {"batchnorm": layer_steps(bn, x, grad), "renorm": layer_steps(brn, x, grad)}
    train_t = interleaved_times(
        {name: train for name, (train, _) in steps.items()}, reps=reps, warmup=warmup, device=dev
    )
    eval_t = interleaved_times(
        {name: evaluate for name, (_, evaluate) in steps.items()}, reps=reps, warmup=warmup, device=dev
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


def _layer_input_and_grad(
    shape: tuple[int, ...], *, dtype: torch.dtype, channels_last: bool, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded input (mean 0.5, std 2) and output gradient of `shape`, in the memory format asked for
    (channels_last only applies to 4-D and 5-D shapes)."""
    if channels_last and len(shape) == 4:
        fmt = torch.channels_last
    elif channels_last and len(shape) == 5:
        fmt = torch.channels_last_3d
    else:
        fmt = torch.contiguous_format
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) * 2.0 + 0.5).to(device=device, dtype=dtype)
    if fmt is not torch.contiguous_format:
        x = x.contiguous(memory_format=fmt)
    grad = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    return x, grad


def _clipping_layer_pair(
    shape: tuple[int, ...], *, rmax: float, dmax: float, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """nn.BatchNorm and BatchRenorm for `shape`'s channels, with the same moving averages: half the
    channels far from the input's batch statistics (so renorm's r and d stay clipped through every
    repetition), the other half matching them (no clipping)."""
    from brn_cli.nn.layer import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

    c = shape[1]
    bn_cls, brn_cls = {
        2: (nn.BatchNorm1d, BatchRenorm1d),
        3: (nn.BatchNorm1d, BatchRenorm1d),
        4: (nn.BatchNorm2d, BatchRenorm2d),
        5: (nn.BatchNorm3d, BatchRenorm3d),
    }[len(shape)]
    # A small momentum (cost-neutral) keeps the moving averages far from the batch for hundreds of steps.
    bn = bn_cls(c, momentum=1e-4).to(device=device, dtype=dtype)
    brn = brn_cls(c, momentum=1e-4, rmax=rmax, dmax=dmax).to(device=device, dtype=dtype)
    with torch.no_grad():
        far = torch.arange(c) % 2 == 0
        for layer in (bn, brn):
            layer.running_mean.copy_(torch.where(far, torch.tensor(50.0), torch.tensor(0.5)))
            layer.running_var.copy_(torch.where(far, torch.tensor(1e-4), torch.tensor(4.0)))
    return bn, brn


# ----------------------------------------------------------------------------------------------
# Issue 5 (helper F): sweeps, whole-model training steps, ONNX folding, a peer implementation.
# ----------------------------------------------------------------------------------------------

__all__ += ["bench_layer_sweep", "bench_model_step", "bench_onnx_fold", "bench_peer", "machine_info"]

# (N, C, H, W) activation shapes of a ResNet-50 at batch 32 / 224 px scaled down: early (many pixels,
# few channels), middle, late (few pixels, many channels); BatchNorm1d feature batches of widths 64-1024
# at batch 256 (MLPs, RL critics); small 2-D maps (detection heads, small batches), where the per-channel
# bookkeeping, not the activations, sets the cost.
SWEEP_SHAPES: tuple[tuple[int, ...], ...] = (
    (32, 64, 56, 56),
    (32, 256, 28, 28),
    (32, 1024, 7, 7),
    (256, 64),
    (256, 128),
    (256, 256),
    (256, 512),
    (256, 1024),
    (8, 16, 14, 14),
    (8, 32, 7, 7),
    (4, 64, 14, 14),
)


def machine_info() -> dict[str, Any]:
    """What a benchmark ran on: CPU model and cores, threads, torch version, GPU name if any, date."""
    import datetime
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def bench_layer_sweep(
    shapes: Sequence[Sequence[int]] = SWEEP_SHAPES,
    *,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    channels_last: Sequence[bool] = (False, True),
    device: str | torch.device = "cpu",
    reps: int = 20,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`bench_layer` over shapes x dtypes x memory formats (channels_last only for 4-D/5-D shapes).

    Returns one bench_layer result per combination, in order. `progress(label)` is called before each.
    """
    results = []
    for shape in shapes:
        for dtype in dtypes:
            for cl in channels_last:
                if cl and len(shape) not in (4, 5):
                    continue
                if progress is not None:
                    progress(
                        f"layer {list(shape)} {str(dtype).removeprefix('torch.')}{' NHWC' if cl else ''}"
                    )
                results.append(
                    bench_layer(shape, dtype=dtype, channels_last=cl, device=device, reps=reps, warmup=warmup)
                )
    return results


def _import_torchvision(part: str):
    """torchvision builds the ResNets these parts time; it is optional (not a dependency of brn)."""
    try:
        import torchvision
    except ImportError:
        raise BrnError(f"`what={part}` needs torchvision installed (pip install torchvision)") from None
    return torchvision


def bench_model_step(
    arch: str = "resnet18",
    *,
    batch: int = 16,
    image_size: int = 112,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    reps: int = 10,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Whole-model training step (forward, cross-entropy, backward, SGD update) with BatchNorm vs renorm.

    Two copies of a torchvision model with identical weights; one converted to Batch Renorm with the
    paper's final limits (rmax 3, dmax 5) so the renorm path is live. `dtype` bfloat16 runs the forward
    under autocast (weights stay float32), as mixed-precision training does. Interleaved rounds, the
    ratio is the median of per-round renorm/batchnorm ratios (:func:`paired_ratio`).
    """
    import copy

    from brn_cli.nn.convert import convert_batchnorm
    from brn_cli.nn.norms import set_renorm_limits

    torchvision = _import_torchvision("models")

    dev = torch.device(device)
    torch.manual_seed(seed)
    bn_model = getattr(torchvision.models, arch)(num_classes=100).to(dev)
    brn_model = convert_batchnorm(copy.deepcopy(bn_model), momentum=0.01)
    # Limits off their no-op values (1, 0), so that r and d are computed and clipped at every step.
    layers = set_renorm_limits(brn_model, rmax=3.0, dmax=5.0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    bn_model.to(memory_format=fmt)
    brn_model.to(memory_format=fmt)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 100, (batch,), generator=gen).to(dev)
    use_amp = dtype != torch.float32

    def step(model: nn.Module) -> Callable[[], None]:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        model.train()

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=dtype, enabled=use_amp):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()

        return run

    times = interleaved_times(
        {"batchnorm": step(bn_model), "renorm": step(brn_model)}, reps=reps, warmup=warmup, device=dev
    )
    return {
        "arch": arch,
        "batch": batch,
        "image_size": image_size,
        "dtype": str(dtype).removeprefix("torch."),
        "channels_last": channels_last,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "renorm_layers": layers,
        "reps": reps,
        "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "ratio": paired_ratio(times["renorm"], times["batchnorm"]),
    }


def bench_onnx_fold(
    arch: str = "resnet18", *, batch: int = 1, image_size: int = 224, repeats: int = 30
) -> dict[str, Any]:
    """onnxruntime latency (CPU, 1 thread) of the folded export against an unfolded one, both verified.

    Uses :func:`brn_cli.deploy.export.export_onnx_checked` with ``benchmark=True`` on a renorm-converted
    torchvision model; returns the medians per ORT optimization level and the unfolded/folded ratios.
    """
    import tempfile
    from pathlib import Path

    from brn_cli.deploy.export import export_onnx_checked
    from brn_cli.nn.convert import convert_batchnorm

    torchvision = _import_torchvision("onnx")

    torch.manual_seed(0)
    model = convert_batchnorm(getattr(torchvision.models, arch)(), momentum=0.01).eval()
    with tempfile.TemporaryDirectory(prefix="brn-bench-onnx-") as scratch:
        report = export_onnx_checked(
            model,
            [max(2, batch), 3, image_size, image_size],
            Path(scratch) / f"{arch}.onnx",
            benchmark=True,
            benchmark_repeats=repeats,
        )
    b = report.benchmark
    return {
        "arch": arch,
        "input": [max(2, batch), 3, image_size, image_size],
        "batch": b.batch,
        "threads": b.threads,
        "repeats": b.repeats,
        "verified": report.verify.passed,
        "folded_layers": len(report.fold.folded) if report.fold is not None else 0,
        "median_ms": b.median_ms,
        "ratio_unfolded_over_folded": {lvl: b.ratio(lvl) for lvl in b.median_ms},
    }


def bench_peer(
    shape: Sequence[int] = (256, 512), *, reps: int = 30, warmup: int = 5, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """brn's BatchRenorm1d against torchrl's BatchRenorm1d (and nn.BatchNorm1d), when torchrl imports.

    Training forward+backward and eval forward on an (N, C) batch, both renorm layers at rmax 3, dmax 5
    with torchrl's warm-up switched off, so both compute r and d every step. Returns
    ``{"measured": False, "reason": ...}`` when torchrl cannot be imported.
    """
    try:
        from torchrl.modules import BatchRenorm1d as PeerRenorm1d
    except Exception as exc:  # ImportError, or a torchrl built against another torch
        return {"measured": False, "reason": f"torchrl not importable ({type(exc).__name__}: {exc})"[:300]}
    import torchrl

    from brn_cli.nn.layer import BatchRenorm1d

    dev = torch.device(device)
    c = int(shape[1])
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 2 + 0.5).to(dev).requires_grad_(True)
    g = torch.randn(*shape, generator=gen).to(dev)
    layers = {
        "batchnorm": nn.BatchNorm1d(c, momentum=0.01).to(dev),
        "brn": BatchRenorm1d(c, momentum=0.01, rmax=3.0, dmax=5.0).to(dev),
        "torchrl": PeerRenorm1d(c, momentum=0.01, max_r=3.0, max_d=5.0, warmup_steps=0).to(dev),
    }

    steps = {name: layer_steps(layer, x, g) for name, layer in layers.items()}
    t_train = interleaved_times(
        {name: train for name, (train, _) in steps.items()}, reps=reps, warmup=warmup, device=dev
    )
    t_eval = interleaved_times(
        {name: evaluate for name, (_, evaluate) in steps.items()}, reps=reps, warmup=warmup, device=dev
    )
    return {
        "measured": True,
        "torchrl": str(torchrl.__version__),
        "shape": list(shape),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "ms": {
            "train": {k: statistics.median(v) * 1e3 for k, v in t_train.items()},
            "eval": {k: statistics.median(v) * 1e3 for k, v in t_eval.items()},
        },
        "ratio_torchrl_over_brn": {
            "train": paired_ratio(t_train["torchrl"], t_train["brn"]),
            "eval": paired_ratio(t_eval["torchrl"], t_eval["brn"]),
        },
        "ratio_brn_over_batchnorm": {
            "train": paired_ratio(t_train["brn"], t_train["batchnorm"]),
            "eval": paired_ratio(t_eval["brn"], t_eval["batchnorm"]),
        },
    }


__all__ += ["bench_ops"]

# Shapes whose op counts `brn bench --what ops` reports (the count does not depend on the sizes).
OPS_SHAPES: tuple[tuple[int, ...], ...] = ((256, 512), (8, 16, 14, 14))


def bench_ops(
    shapes: Sequence[Sequence[int]] = OPS_SHAPES, *, device: str | torch.device = "cpu"
) -> list[dict[str, Any]]:
    """Aten operations dispatched by one training step (forward, backward) of nn.BatchNorm and of the
    renorm layer (rmax 3, dmax 5, r and d clipped in half the channels), per shape, for fp32 activations
    and for bf16 activations into fp32 layers (autocast). Deterministic: no clock involved."""
    from brn_cli.nn.opcount import count_layer_step

    dev = torch.device(device)
    rows = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        for dtype in (torch.float32, torch.bfloat16):
            x, _ = _layer_input_and_grad(shape, dtype=dtype, channels_last=False, device=dev, seed=0)
            layers = _clipping_layer_pair(shape, rmax=3.0, dmax=5.0, dtype=torch.float32, device=dev)
            bn, brn = (count_layer_step(layer, x) for layer in layers)
            rows.append(
                {
                    "shape": list(shape),
                    "dtype": str(dtype).removeprefix("torch."),
                    "device": str(dev),
                    "batchnorm": [bn.forward, bn.backward],
                    "renorm": [brn.forward, brn.backward],
                    "renorm_forward_ops": brn.forward_ops,
                }
            )
    return rows


def _ops_markdown(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    lines = [
        "| op count (one training step) | activations | BN forward / backward | BRN forward / backward |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} ({r['device']}) | {r['dtype']} | "
            f"{r['batchnorm'][0]} / {r['batchnorm'][1]} | {r['renorm'][0]} / {r['renorm'][1]} |"
        )
    return [*lines, ""]


__all__ += ["bench_crossq_step", "crossq_critic"]


def crossq_critic(
    in_features: int, hidden: Sequence[int] = (256, 256), norm: Callable[[int], nn.Module] = nn.BatchNorm1d
) -> nn.Sequential:
    """A CrossQ Q-network (Bhatt et al., ICLR 2024; their SBX code): a norm on the (state, action) input,
    then Linear -> ReLU -> norm per hidden layer, and a linear output."""
    layers: list[nn.Module] = [norm(in_features)]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), norm(h)]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _crossq_update(
    critics: nn.ModuleList, batch: dict[str, torch.Tensor], gamma: float = 0.99
) -> Callable[[], None]:
    """One CrossQ critic update: (s, a) and (s', a') through each critic in ONE training forward (so both
    halves share the batch statistics; CrossQ has no target network), the target from the detached next
    half, mean squared error, Adam step."""
    opt = torch.optim.Adam(critics.parameters(), lr=3e-4)
    critics.train()
    joint = torch.cat([batch["obs_act"], batch["next_obs_act"]])
    n = batch["obs_act"].shape[0]

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        q_now, q_next = zip(*(critic(joint).split(n) for critic in critics), strict=True)
        next_value = torch.min(torch.stack(q_next), dim=0).values.detach()
        target = batch["reward"] + gamma * (1.0 - batch["done"]) * next_value
        loss = sum(nn.functional.mse_loss(q, target) for q in q_now)
        loss.backward()
        opt.step()

    return run


def bench_crossq_step(
    *,
    batch: int = 256,
    obs_dim: int = 17,
    act_dim: int = 6,
    hidden: Sequence[int] = (256, 256),
    critics: int = 2,
    device: str | torch.device = "cpu",
    reps: int = 50,
    warmup: int = 10,
    seed: int = 0,
    compiled: bool = False,
) -> dict[str, Any]:
    """CrossQ critic update with BatchRenorm1d (rmax 3, dmax 5: CrossQ after its warm-up) vs nn.BatchNorm1d.

    Twin critics of identical weights (the renorm pair converted from the BatchNorm pair), momentum 0.01
    (CrossQ's 0.99 in Flax's convention), a HalfCheetah-sized transition batch (17 + 6 inputs). Interleaved
    rounds; the ratio is the median of per-round renorm/batchnorm ratios (:func:`paired_ratio`).
    `compiled` runs each critic through torch.compile (static shapes; the first warm-up round compiles).
    """
    import copy

    from brn_cli.nn.convert import convert_batchnorm
    from brn_cli.nn.norms import set_renorm_limits

    dev = torch.device(device)
    torch.manual_seed(seed)
    bn = nn.ModuleList(crossq_critic(obs_dim + act_dim, hidden) for _ in range(critics)).to(dev)
    brn = convert_batchnorm(copy.deepcopy(bn), momentum=0.01, rmax=3.0, dmax=5.0)
    for critic in bn.modules():
        if isinstance(critic, nn.BatchNorm1d):
            critic.momentum = 0.01
    layers = set_renorm_limits(brn, rmax=3.0, dmax=5.0)
    gen = torch.Generator().manual_seed(seed)
    data = {
        "obs_act": torch.randn(batch, obs_dim + act_dim, generator=gen),
        "next_obs_act": torch.randn(batch, obs_dim + act_dim, generator=gen),
        "reward": torch.randn(batch, 1, generator=gen),
        "done": (torch.rand(batch, 1, generator=gen) < 0.01).float(),
    }
    data = {k: v.to(dev) for k, v in data.items()}
    if compiled:
        import torch._dynamo as dynamo

        dynamo.reset()  # a fresh compile cache: no recompile limit left over from earlier parts
        bn, brn = (nn.ModuleList(torch.compile(c, dynamic=False) for c in m) for m in (bn, brn))
    times = interleaved_times(
        {"batchnorm": _crossq_update(bn, data), "renorm": _crossq_update(brn, data)},
        reps=reps,
        warmup=max(warmup, 2) if compiled else warmup,
        device=dev,
    )
    return {
        "batch": batch,
        "inputs": obs_dim + act_dim,
        "hidden": [int(h) for h in hidden],
        "critics": critics,
        "renorm_layers": layers,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "reps": reps,
        "compiled": compiled,
        "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "ratio": paired_ratio(times["renorm"], times["batchnorm"]),
    }


def _crossq_markdown(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    lines = [
        "| CrossQ critic update (joint (s,a)/(s',a') forward, Adam) | ms BN | ms BRN | ratio BRN/BN |",
        "|---|---|---|---|",
    ]
    for r in rows:
        widths = "-".join(map(str, r["hidden"]))
        lines.append(
            f"| {r['critics']} critics, {r['inputs']}-{widths}-1, batch {r['batch']} ({r['device']}, "
            f"{r['threads']} thread{'s' if r['threads'] != 1 else ''}{', compiled' if r.get('compiled') else ''}) | "
            f"{r['ms']['batchnorm']:.3f} | "
            f"{r['ms']['renorm']:.3f} | {r['ratio']:.3f} |"
        )
    return [*lines, ""]


__all__ += ["COMPILED_SHAPES", "bench_compiled", "bench_compiled_layer"]

# Layer inputs of `brn bench --what compiled`: an MLP / critic feature batch, a small 2-D map where the
# per-channel work dominates, and an early ResNet activation where the passes over the data do.
COMPILED_SHAPES: tuple[tuple[int, ...], ...] = ((256, 512), (8, 16, 14, 14), (32, 64, 56, 56))


def bench_compiled_layer(
    shape: Sequence[int] = (256, 512),
    *,
    device: str | torch.device = "cpu",
    reps: int = 30,
    warmup: int = 5,
    rmax: float = 3.0,
    dmax: float = 5.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Training step (forward + backward) of ``torch.compile(nn.BatchNorm)`` vs ``torch.compile(BatchRenorm)``
    on the inputs and moving averages of :func:`bench_layer` (r and d clipped in half the channels).

    Static shapes, compiled afresh; the first warm-up round compiles. Interleaved rounds, paired ratio
    against the compiled-layer target. Also what one compiled step launches, per layer
    (:func:`brn_cli.nn.opcount.count_compiled_step`, run on copies so the timed layers keep their state).
    """
    import copy

    import torch._dynamo as dynamo

    from brn_cli.nn.opcount import count_compiled_step

    dev = torch.device(device)
    shape = tuple(int(s) for s in shape)
    x, grad = _layer_input_and_grad(shape, dtype=torch.float32, channels_last=False, device=dev, seed=seed)
    layers = _clipping_layer_pair(shape, rmax=rmax, dmax=dmax, dtype=torch.float32, device=dev)
    pair = dict(zip(("batchnorm", "renorm"), layers, strict=True))
    counts = {name: count_compiled_step(copy.deepcopy(layer), x) for name, layer in pair.items()}
    dynamo.reset()
    steps = {
        name: layer_steps(torch.compile(layer, dynamic=False), x, grad)[0] for name, layer in pair.items()
    }
    times = interleaved_times(steps, reps=reps, warmup=max(warmup, 1), device=dev)
    ratio = paired_ratio(times["renorm"], times["batchnorm"])
    return {
        "shape": list(shape),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "reps": reps,
        "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "ratio": ratio,
        "target": LAYER_TARGETS["train"],
        "pass": ratio <= LAYER_TARGETS["train"],
        "launches": {
            name: {
                "forward": c.forward,
                "backward": c.backward,
                "forward_kernels": c.forward_kernels,
                "backward_kernels": c.backward_kernels,
                "forward_ops": c.forward_ops,
                "backward_ops": c.backward_ops,
                "opaque": {**c.forward_opaque, **c.backward_opaque},
            }
            for name, c in counts.items()
        },
    }


def bench_compiled(
    shapes: Sequence[Sequence[int]] = COMPILED_SHAPES,
    *,
    device: str | torch.device = "cpu",
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compiled training steps, renorm vs BatchNorm: :func:`bench_compiled_layer` per shape and the CrossQ
    critic update with compiled critics. `quick` runs one small layer and few repetitions."""
    say = progress or (lambda _t: None)
    rows = []
    for shape in ((16, 32),) if quick else shapes:
        say(f"compiled layer {list(shape)}")
        big = math.prod(shape) > 1_000_000
        reps = 3 if quick else (10 if big else 30)
        rows.append(bench_compiled_layer(shape, device=device, reps=reps, warmup=1 if quick else 3))
    say("compiled CrossQ critic update")
    crossq = bench_crossq_step(
        device=device, reps=5 if quick else 50, warmup=2 if quick else 10, compiled=True
    )
    return {"layers": rows, "crossq": [crossq]}


def _compiled_markdown(results: dict[str, Any] | None) -> list[str]:
    if not results:
        return []
    lines = [
        "| compiled training step (torch.compile) | ms BN | ms BRN | ratio BRN/BN (target) "
        "| launches BN fwd / bwd | launches BRN fwd / bwd | BRN launches: forward; backward |",
        "|---|---|---|---|---|---|---|",
    ]

    def detail(c: dict[str, Any], phase: str) -> str:
        ops = ", ".join(f"{name} x{n}" for name, n in c[f"{phase}_ops"].items())
        n = c[f"{phase}_kernels"]
        return f"{n} kernel{'s' if n != 1 else ''}" + (f" + {ops}" if ops else "")

    for r in results["layers"]:
        bn, brn = r["launches"]["batchnorm"], r["launches"]["renorm"]
        opaque = ", ".join(f"{name} x{n}" for name, n in brn["opaque"].items())
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} ({r['device']}, {r['threads']} thread"
            f"{'s' if r['threads'] != 1 else ''}) | {r['ms']['batchnorm']:.3f} | {r['ms']['renorm']:.3f} | "
            f"{r['ratio']:.3f} ({r['target']:.2f}) | {bn['forward']} / {bn['backward']} | "
            f"{brn['forward']} / {brn['backward']} | {detail(brn, 'forward')}; {detail(brn, 'backward')}"
            f"{f' (opaque: {opaque}, counted as the operations it runs)' if opaque else ''} |"
        )
    return [*lines, "", *_crossq_markdown(results.get("crossq"))]


__all__ += ["BENCH_PARTS", "benchmarks_markdown", "run_benchmarks"]

BENCH_PARTS = ("layer", "models", "onnx", "peer", "ops", "crossq", "compiled")


def run_benchmarks(
    parts: Sequence[str] = BENCH_PARTS,
    *,
    device: str | torch.device = "cpu",
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the chosen benchmark parts; returns {"machine": ..., "layer": [...], "models": [...], ...}.

    On CUDA the layer sweep and model steps run on the GPU (synchronized around every timed call); ONNX
    Runtime and the torchrl comparison stay on the CPU. `quick` shrinks shapes and repetitions.
    """
    from brn_cli.errors import BrnError

    unknown = [p for p in parts if p not in BENCH_PARTS]
    if unknown:
        raise BrnError(f"`what` {unknown[0]!r}: choose from {', '.join(BENCH_PARTS)}")
    dev = torch.device(device)
    say = progress or (lambda _t: None)
    results: dict[str, Any] = {"machine": machine_info(), "device": str(dev)}
    if "layer" in parts:
        shapes = ((8, 64, 28, 28), (64, 128)) if quick else SWEEP_SHAPES
        results["layer"] = bench_layer_sweep(
            shapes, device=dev, reps=5 if quick else 20, warmup=1 if quick else 3, progress=say
        )
    if "models" in parts:
        results["models"] = []
        archs = ("resnet18",) if quick else ("resnet18", "resnet50")
        size, batch = (64, 4) if quick else ((224, 32) if dev.type == "cuda" else (112, 16))
        # bf16 autocast training on a CPU without bf16 matrix units is emulated and many times slower than
        # fp32; nobody trains that way, so the CPU rows are fp32 (the layer sweep still covers bf16).
        dtypes = (torch.float32,) if quick or dev.type == "cpu" else (torch.float32, torch.bfloat16)
        for arch in archs:
            for dtype in dtypes:
                for cl in (False,) if quick else (False, True):
                    say(f"training step {arch} {str(dtype).removeprefix('torch.')}{' NHWC' if cl else ''}")
                    results["models"].append(
                        bench_model_step(
                            arch,
                            batch=batch,
                            image_size=size,
                            device=dev,
                            dtype=dtype,
                            channels_last=cl,
                            reps=3 if quick else 6,
                            warmup=1 if quick else 2,
                        )
                    )
    if "onnx" in parts:
        say("onnx folded vs unfolded")
        results["onnx"] = [
            bench_onnx_fold("resnet18", image_size=64 if quick else 224, repeats=5 if quick else 30)
        ]
    if "peer" in parts:
        say("torchrl BatchRenorm1d")
        results["peer"] = bench_peer(reps=5 if quick else 30, warmup=1 if quick else 5)
    if "ops" in parts:
        say("op counts")
        results["ops"] = bench_ops(device=dev)
    if "crossq" in parts:
        say("CrossQ critic update")
        results["crossq"] = [
            bench_crossq_step(device=dev, reps=5 if quick else 50, warmup=1 if quick else 10)
        ]
    if "compiled" in parts:
        results["compiled"] = bench_compiled(device=dev, quick=quick, progress=say)
    return results


def benchmarks_markdown(results: dict[str, Any]) -> str:
    """The results of :func:`run_benchmarks` as markdown tables (what docs/benchmarks.md records)."""
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch.set_num_threads({m['threads']}); "
        f"torch {m['torch']}, onnxruntime {m.get('onnxruntime')}, Python {m['python']}; "
        f"GPU: {m['gpu'] or 'none'}; {m['date']}. Device benchmarked: {results['device']}.",
        "",
    ]
    if results.get("layer"):
        lines += [
            "| layer input | dtype | layout | train ms BN / BRN | train ratio | eval ms BN / BRN | eval ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["layer"]:
            ms = r["ms"]
            lines.append(
                f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {'NHWC' if r['channels_last'] else 'NCHW'} | "
                f"{ms['train_batchnorm']:.2f} / {ms['train_renorm']:.2f} | {r['ratio']['train']:.2f} | "
                f"{ms['eval_batchnorm']:.2f} / {ms['eval_renorm']:.2f} | {r['ratio']['eval']:.2f} |"
            )
        lines.append("")
    if results.get("models"):
        lines += [
            "| model (training step) | input | precision | layout | ms BN | ms BRN | ratio BRN/BN |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["models"]:
            prec = "fp32" if r["dtype"] == "float32" else f"autocast {r['dtype']}"
            lines.append(
                f"| {r['arch']} ({r['renorm_layers']} norms) | {r['batch']}x3x{r['image_size']}x{r['image_size']} | "
                f"{prec} | {'NHWC' if r['channels_last'] else 'NCHW'} | {r['ms']['batchnorm']:.1f} | "
                f"{r['ms']['renorm']:.1f} | {r['ratio']:.3f} |"
            )
        lines.append("")
    if results.get("onnx"):
        lines += [
            "| ONNX Runtime (CPU, 1 thread) | ORT optimizations | folded ms | unfolded ms | unfolded/folded |",
            "|---|---|---|---|---|",
        ]
        for r in results["onnx"]:
            for level, ms in r["median_ms"].items():
                lines.append(
                    f"| {r['arch']} batch {r['batch']}, {r['input'][-1]} px ({r['folded_layers']} norms folded, "
                    f"verified: {r['verified']}) | {level} | {ms['folded']:.2f} | {ms['unfolded']:.2f} | "
                    f"{r['ratio_unfolded_over_folded'][level]:.2f} |"
                )
        lines.append("")
    peer = results.get("peer")
    if peer is not None:
        if not peer.get("measured"):
            lines.append(f"Peer implementation: not measured: {peer['reason']}")
        else:
            lines += [
                f"| BatchRenorm1d {'x'.join(map(str, peer['shape']))} | nn.BatchNorm1d ms | brn ms | "
                f"torchrl {peer['torchrl']} ms | torchrl/brn | brn/BatchNorm |",
                "|---|---|---|---|---|---|",
            ]
            for phase in ("train", "eval"):
                ms = peer["ms"][phase]
                lines.append(
                    f"| {phase} | {ms['batchnorm']:.3f} | {ms['brn']:.3f} | {ms['torchrl']:.3f} | "
                    f"{peer['ratio_torchrl_over_brn'][phase]:.2f} | {peer['ratio_brn_over_batchnorm'][phase]:.2f} |"
                )
        lines.append("")
    lines += _ops_markdown(results.get("ops"))
    lines += _crossq_markdown(results.get("crossq"))
    lines += _compiled_markdown(results.get("compiled"))
    return "\n".join(lines)
