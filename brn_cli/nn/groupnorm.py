"""Swap every BatchNorm (or Batch Renorm) layer of a model for a GroupNorm: the batch-independent baseline.

GroupNorm (Wu and He, 2018) normalizes each example over groups of channels, so its training and inference
functions are the same and neither batch size nor batch composition reaches it. It is the usual
alternative when batches are small or not i.i.d., the two cases Batch Renorm addresses.

Group count: Wu and He's default of 32 groups, but at least :data:`MIN_GROUP_CHANNELS` channels in each
group (a group of one channel is InstanceNorm, which discards each channel's contrast): the largest
divisor of C not above ``min(32, C // 4)``, and 1 (LayerNorm over channels and positions) when C < 8.
For the sample models' 16, 32 and 64 channels that is 4, 8 and 16 groups of 4 channels.

The GroupNorm takes over the layer's eps and its affine weight and bias (so a swap right after
initialisation starts from the same gamma = 1, beta = 0); running statistics have no counterpart and are
dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from brn_cli.errors import BrnError
from brn_cli.nn.norms import is_batch_norm, norm_channels, set_submodule

__all__ = ["MAX_GROUPS", "MIN_GROUP_CHANNELS", "group_count", "swap_batchnorm_for_groupnorm"]

MAX_GROUPS = 32
MIN_GROUP_CHANNELS = 4


def group_count(
    channels: int, *, max_groups: int = MAX_GROUPS, min_channels: int = MIN_GROUP_CHANNELS
) -> int:
    """The number of GroupNorm groups for `channels` channels (see the module docstring)."""
    if channels < 1:
        raise BrnError(f"`channels` must be >= 1, got {channels}")
    limit = max(1, min(max_groups, channels // min_channels))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def _group_norm_like(layer: nn.Module, groups: int) -> nn.GroupNorm:
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    affine = weight is not None and bias is not None
    new = nn.GroupNorm(groups, norm_channels(layer), eps=float(layer.eps), affine=affine)
    if affine:
        new.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            new.bias.copy_(bias)
    return new


def swap_batchnorm_for_groupnorm(
    model: nn.Module, *, max_groups: int = MAX_GROUPS, min_channels: int = MIN_GROUP_CHANNELS
) -> dict[str, int]:
    """Replace, in place, every BatchNorm / Batch Renorm layer of `model` with a GroupNorm over the same
    channels; returns {layer name: group count}. A model without such layers is refused (nothing to swap)."""
    layers = [(name, m) for name, m in model.named_modules() if name and is_batch_norm(m)]
    if not layers:
        raise BrnError(f"the model ({type(model).__name__}) has no BatchNorm layers to swap for GroupNorm")
    swapped = {}
    for name, layer in layers:
        groups = group_count(norm_channels(layer), max_groups=max_groups, min_channels=min_channels)
        set_submodule(model, name, _group_norm_like(layer, groups))
        swapped[name] = groups
    return swapped
