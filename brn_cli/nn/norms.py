"""What counts as a norm layer, decided once for every command.

Conversion, folding, inspection, calibration, evaluation, checkpoints and distributed training all ask the
same questions of a module: is it a BatchNorm (torch's, including SyncBatchNorm and timm's BatchNormAct2d,
which subclass it), a Batch Renorm layer (brn's, or torchrl's / sb3-contrib's), a frozen BatchNorm, a
per-example norm? Does it keep running statistics? Which layers of a model are renorm layers? The answers
live here, so the commands cannot disagree about which layers they handle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from brn_cli.errors import BrnError
from brn_cli.nn.layer import TELEMETRY_FIELDS, BatchRenormNd

__all__ = [
    "BATCH_NORM_TYPES",
    "INSPECTED_NORM_TYPES",
    "PER_EXAMPLE_NORM_TYPES",
    "TORCH_BATCH_NORMS",
    "collect_telemetry",
    "folds_as_batch_norm",
    "frozen_norm_has_act",
    "has_running_stats",
    "is_batch_norm",
    "is_frozen_batch_norm",
    "is_inspected_norm",
    "is_peer_renorm",
    "is_per_example_norm",
    "is_renorm",
    "is_timm_norm_act",
    "is_torch_batch_norm",
    "norm_channels",
    "norm_layers",
    "peer_renorm_class",
    "renorm_layer_settings",
    "renorm_layers",
    "runs_torch_batch_norm_forward",
    "set_microbatch",
    "set_renorm_limits",
    "set_submodule",
]

# Layers that normalize with batch statistics in training and running statistics at inference.
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, BatchRenormNd)
# torch's concrete BatchNorm classes, whose forward brn knows (converts and folds).
TORCH_BATCH_NORMS: tuple[type[_BatchNorm], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
# Norms computed from each example alone: never an affine map of fixed statistics, so never folded.
PER_EXAMPLE_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm, _InstanceNorm)
# What `brn inspect` lists (frozen BatchNorms too, matched by name: see is_frozen_batch_norm).
INSPECTED_NORM_TYPES: tuple[type[nn.Module], ...] = (*BATCH_NORM_TYPES, *PER_EXAMPLE_NORM_TYPES)
_TIMM_NORM_ACT = ("BatchNormAct2d", "SyncBatchNormAct")
# Batch Renorm layers of other libraries (CrossQ critics use them), as (top-level package, class name):
# torchrl.modules.BatchRenorm1d and sb3_contrib.common.torch_layers.BatchRenorm (and its BatchRenorm1d).
# Matched by name, as frozen BatchNorms: neither library is a dependency. nn.peers converts them.
PEER_RENORM_CLASSES = frozenset({("torchrl", "BatchRenorm1d"), ("sb3_contrib", "BatchRenorm")})


def is_torch_batch_norm(module: nn.Module) -> bool:
    """One of torch's BatchNorm layers (any subclass of ``_BatchNorm``: SyncBatchNorm, timm's BatchNormAct2d)."""
    return isinstance(module, _BatchNorm)


def is_renorm(module: nn.Module) -> bool:
    """A Batch Renorm layer of brn."""
    return isinstance(module, BatchRenormNd)


def is_batch_norm(module: nn.Module) -> bool:
    """A torch BatchNorm or a Batch Renorm layer (the layers whose statistics evaluate/calibrate handle)."""
    return isinstance(module, BATCH_NORM_TYPES)


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """torchvision's or timm's FrozenBatchNorm2d: a per-channel affine map with BatchNorm-named buffers.

    Matched by class name: neither library is a dependency, and importing them to check a type would make
    every check pay for the import.
    """
    return "FrozenBatchNorm" in type(module).__name__


def peer_renorm_class(module: nn.Module) -> type | None:
    """The torchrl / sb3-contrib Batch Renorm class `module` is an instance of (itself or a base), or None."""
    for cls in type(module).__mro__:
        if (cls.__module__.partition(".")[0], cls.__name__) in PEER_RENORM_CLASSES:
            return cls
    return None


def is_peer_renorm(module: nn.Module) -> bool:
    """A Batch Renorm layer of torchrl or sb3-contrib (not brn's: those are :func:`is_renorm`)."""
    return peer_renorm_class(module) is not None


def frozen_norm_has_act(module: nn.Module) -> bool:
    """timm's FrozenBatchNormAct2d: a frozen BatchNorm followed by its own `drop` and `act` children."""
    return is_frozen_batch_norm(module) and "Act" in type(module).__name__


def folds_as_batch_norm(module: nn.Module) -> bool:
    """Whether `module`'s inference form is BatchNorm's per-channel affine map of fixed statistics: a
    BatchNorm or renorm layer with running statistics, or a frozen BatchNorm (folding and export treat
    them alike)."""
    if has_running_stats(module):
        return True
    return is_frozen_batch_norm(module) and all(
        isinstance(getattr(module, key, None), torch.Tensor) for key in ("running_mean", "running_var")
    )


def norm_channels(module: nn.Module) -> int:
    """The channel count of a BatchNorm-like layer (frozen BatchNorms keep it only as their buffers' length)."""
    features = getattr(module, "num_features", None)
    return int(features) if features is not None else int(module.running_mean.numel())


def is_per_example_norm(module: nn.Module) -> bool:
    """GroupNorm, LayerNorm or InstanceNorm: statistics of each example, nothing to fold or calibrate."""
    return isinstance(module, PER_EXAMPLE_NORM_TYPES)


def is_inspected_norm(module: nn.Module) -> bool:
    """Any normalization layer `brn inspect` reports (torchrl's and sb3-contrib's Batch Renorm too)."""
    return isinstance(module, INSPECTED_NORM_TYPES) or is_frozen_batch_norm(module) or is_peer_renorm(module)


def is_timm_norm_act(module: nn.Module) -> bool:
    """timm's BatchNormAct2d / SyncBatchNormAct (a BatchNorm followed by its own dropout and activation)."""
    cls = type(module)
    return cls.__name__ in _TIMM_NORM_ACT and cls.__module__.startswith("timm.")


def runs_torch_batch_norm_forward(module: nn.Module) -> bool:
    """One of :data:`TORCH_BATCH_NORMS`, or a subclass that keeps its forward (brn knows what it computes)."""
    forward = type(module).forward
    return any(
        isinstance(module, base) and forward in (base.forward, _BatchNorm.forward)
        for base in TORCH_BATCH_NORMS
    )


def has_running_stats(module: nn.Module) -> bool:
    """A BatchNorm or Batch Renorm layer whose inference form is a per-channel affine map (running stats)."""
    if is_renorm(module):
        return True
    return is_torch_batch_norm(module) and module.running_mean is not None and module.running_var is not None


def norm_layers(model: nn.Module, *, with_stats: bool = True) -> list[tuple[str, nn.Module]]:
    """Named BatchNorm / Batch Renorm layers of `model`; with `with_stats`, only those with running statistics."""
    check = has_running_stats if with_stats else is_batch_norm
    return [(name, m) for name, m in model.named_modules() if check(m)]


def renorm_layers(model: nn.Module) -> list[tuple[str, BatchRenormNd]]:
    """Named Batch Renorm layers of `model`, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BatchRenormNd)]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` of `model` (``layer1.0.bn1``); `name` must not be empty.

    torch's own ``Module.set_submodule`` arrived in 2.5; brn supports torch 2.4.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def set_renorm_limits(model: nn.Module, rmax: float, dmax: float) -> int:
    """Set rmax and dmax on every renorm layer of `model`; returns how many layers were set.

    A :class:`~brn_cli.train.schedule.RenormScheduler` does this from the optimizer step; set them by hand
    for a constant schedule.

    Example::

        >>> import torch
        >>> from brn_cli import BatchRenorm2d, set_renorm_limits
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), BatchRenorm2d(8))
        >>> set_renorm_limits(model, 3.0, 5.0), model[1].rmax, model[1].dmax
        (1, 3.0, 5.0)
    """
    layers = renorm_layers(model)
    for _, module in layers:
        module.rmax = float(rmax)
        module.dmax = float(dmax)
    return len(layers)


def renorm_layer_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-layer renorm settings, as recorded in a brn checkpoint."""
    return {
        name: {
            "type": type(module).__name__,
            "num_features": int(module.num_features),
            "eps": float(module.eps),
            "momentum": float(module.momentum),
            "rmax": float(module.rmax),
            "dmax": float(module.dmax),
            "affine": bool(module.affine),
        }
        for name, module in renorm_layers(model)
    }


def set_microbatch(model: nn.Module, k: int | None) -> int:
    """Set ``microbatch = k`` on every renorm layer of `model` (None: normalize the whole batch).

    Plain nn.BatchNorm layers cannot normalize microbatches: convert them first (convert_batchnorm with
    rmax=1, dmax=0 is the same function as BatchNorm). Returns the number of layers set.

    Example::

        >>> import torch
        >>> from brn_cli import BatchRenorm1d, set_microbatch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), BatchRenorm1d(8))
        >>> set_microbatch(model, 4)  # a batch of 16 is normalized as 4 groups of 4
        1
        >>> model(torch.randn(16, 4)).shape
        torch.Size([16, 8])
    """
    if k is not None and int(k) < 1:
        raise BrnError(f"microbatch must be >= 1, got {k}", param="microbatch")
    layers = renorm_layers(model)
    for _, module in layers:
        module.microbatch = None if k is None else int(k)
    return len(layers)


def collect_telemetry(model: nn.Module) -> dict[str, float]:
    """Average the last-step telemetry over every renorm layer of `model` (one host sync).

    Returns {} when no renorm layer has run a training step yet.
    """
    rows = [m.telemetry for _, m in renorm_layers(model)]
    if not rows:
        return {}
    devices = {t.device for t in rows}
    stacked = torch.stack(rows if len(devices) == 1 else [t.cpu() for t in rows]).cpu()  # the one sync
    valid = stacked[~torch.isnan(stacked).any(dim=1)]
    if valid.numel() == 0:
        return {}
    return dict(zip(TELEMETRY_FIELDS, valid.mean(0).tolist(), strict=True))
