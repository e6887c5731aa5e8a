"""What counts as a norm layer, and the loops over them (one place for every such check)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from brn_cli.errors import BrnError
from brn_cli.nn.layer import BatchRenormNd

__all__ = [
    "is_norm_layer",
    "norm_layers",
    "set_renorm_limits",
    "set_microbatch",
]


def is_norm_layer(module: nn.Module) -> bool:
    """A BatchNorm or Batch Renorm layer (the layers whose statistics evaluate/calibrate handle)."""
    from brn_cli.nn.layer import BatchRenormNd

    return isinstance(module, (_BatchNorm, BatchRenormNd))


def is_norm_with_stats(module: nn.Module) -> bool:
    """A BatchNorm or Batch Renorm module whose inference form is a per-channel affine map."""
    if isinstance(module, BatchRenormNd):
        return True
    return (
        isinstance(module, _BatchNorm) and module.running_mean is not None and module.running_var is not None
    )


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named BatchNorm / Batch Renorm layers that keep running statistics."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if is_norm_layer(m) and getattr(m, "running_mean", None) is not None and m.running_var is not None
    ]


def set_renorm_limits(model: Any, rmax: float, dmax: float) -> int:
    """Set rmax and dmax on every BatchRenormNd of `model`; returns how many layers were set."""
    from brn_cli.nn.layer import BatchRenormNd

    count = 0
    for module in model.modules():
        if isinstance(module, BatchRenormNd):
            module.rmax = float(rmax)
            module.dmax = float(dmax)
            count += 1
    return count


def renorm_layer_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-layer renorm settings, as recorded in a brn checkpoint."""
    from brn_cli.nn.layer import BatchRenormNd

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BatchRenormNd):
            out[name] = {
                "type": type(module).__name__,
                "num_features": int(module.num_features),
                "eps": float(module.eps),
                "momentum": float(module.momentum),
                "rmax": float(module.rmax),
                "dmax": float(module.dmax),
                "affine": bool(module.affine),
            }
    return out


def set_microbatch(model: torch.nn.Module, k: int | None) -> int:
    """Set ``microbatch = k`` on every BatchRenormNd of `model` (None: normalize the whole batch).

    Plain nn.BatchNorm layers cannot normalize microbatches: convert them first (convert_batchnorm with
    rmax=1, dmax=0 is the same function as BatchNorm). Returns the number of layers set.
    """
    from brn_cli.nn.layer import BatchRenormNd

    if k is not None and int(k) < 1:
        raise BrnError(f"--microbatch must be >= 1, got {k}")
    count = 0
    for module in model.modules():
        if isinstance(module, BatchRenormNd):
            module.microbatch = None if k is None else int(k)
            count += 1
    return count
