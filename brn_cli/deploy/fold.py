r"""Fold inference-form normalization layers into the layer that produces their input.

In eval mode a BatchNorm or Batch Renorm layer is the per-channel affine map

    y = gamma * (x - mu) / sqrt(var + eps) + beta = s * x + (beta - s * mu),   s = gamma / sqrt(var + eps)

(renorm stores sigma^2 - eps in ``running_var``, so this is the same expression; a frozen BatchNorm,
torchvision's or timm's FrozenBatchNorm2d, is this map with the same buffers). When the producer of
``x`` is a convolution or a linear layer whose output nothing else reads, the map folds into its weights:

* Conv (any dims, any groups, weight [Cout, Cin/g, k...]): ``W'[c] = W[c] * s[c]``,
  ``b' = (b - mu) * s + beta``;
* ConvTranspose (weight [Cin, Cout/g, k...]): view as [g, Cin/g, Cout/g, k...] and scale axis 2 by s viewed
  [g, 1, Cout/g, 1...] (PyTorch's own ``fuse_conv_bn_weights`` is wrong for groups > 1);
* Linear followed by a norm over its output features: ``W' = s[:, None] * W``, same bias formula.

Producers are found on the traced graph (:func:`brn_cli.deploy.graph.find_fold_sites`), never by module order.
The arithmetic runs in float64 and is cast back to the producer's dtype (eps = 1e-5 is subnormal in fp16).
A norm that cannot fold (first layer, after an activation/add/concat, shared producer...) becomes one
:class:`ChannelScaleShift` and is reported with its reason.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from brn_cli.deploy.graph import FoldSite, find_fold_sites, trace
from brn_cli.nn.norms import (
    has_running_stats,
    is_frozen_batch_norm,
    is_renorm,
    is_timm_norm_act,
    is_torch_batch_norm,
    runs_torch_batch_norm_forward,
    set_submodule,
)

__all__ = ["ChannelScaleShift", "FoldResult", "fold_model", "norm_scale_shift"]


class ChannelScaleShift(nn.Module):
    """``act(drop(x * scale + shift))`` per channel (axis 1): a norm's inference form that could not fold.

    `drop` and `act` are the norm's own children for norms that carry an activation (timm BatchNormAct2d,
    :class:`~brn_cli.nn.layer.BatchRenormAct`), identity otherwise.
    """

    def __init__(
        self, scale: Tensor, shift: Tensor, drop: nn.Module | None = None, act: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.act(self.drop(x * self.scale.view(shape) + self.shift.view(shape)))

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


class _DropAct(nn.Module):
    """What remains of a norm-with-activation after its affine part folded away: ``act(drop(x))``."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


@dataclass
class FoldResult:
    """The folded copy of a model and what happened to each norm.

    `folded`: (norm name, producer name) pairs; the norm became identity (or its drop/act only).
    `kept`: (norm name, reason) pairs; the norm became a :class:`ChannelScaleShift`, or was left untouched
    when it has no running statistics or unknown behaviour (the reason says which).
    """

    model: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folded": [{"norm": n, "into": p} for n, p in self.folded],
            "kept": [{"norm": n, "reason": r} for n, r in self.kept],
        }


def norm_scale_shift(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """(s, t) in float64 with ``norm_eval(x) = s * x + t`` per channel: s = gamma/sqrt(var+eps), t = beta - s*mu."""
    mean = norm.running_mean.detach().double()
    var = norm.running_var.detach().double()
    scale = torch.rsqrt(var + float(norm.eps))
    if getattr(norm, "weight", None) is not None:
        scale = scale * norm.weight.detach().double()
    shift = -mean * scale
    if getattr(norm, "bias", None) is not None:
        shift = shift + norm.bias.detach().double()
    return scale, shift


def _unknown_behaviour(norm: nn.Module) -> str | None:
    """Why `norm` is not a plain (norm [+ drop + act]) module, or None when it is."""
    if is_renorm(norm) or is_timm_norm_act(norm) or runs_torch_batch_norm_forward(norm):
        return None
    if is_frozen_batch_norm(norm):  # torchvision's and timm's: the same affine map (timm's Act adds drop/act)
        return None
    return f"{type(norm).__qualname__} overrides forward(); left unchanged"


def _remainder(norm: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    drop, act = getattr(norm, "drop", None), getattr(norm, "act", None)
    return (
        drop if isinstance(drop, nn.Module) else None,
        act if isinstance(act, nn.Module) else None,
    )


@torch.no_grad()
def _fold_into(producer: nn.Module, norm: nn.Module) -> None:
    """Fold the norm's affine map into `producer`'s weight and bias in place (float64 math)."""
    s, t = norm_scale_shift(norm)
    weight = producer.weight
    w = weight.detach().double()
    if isinstance(producer, nn.Linear):
        w = w * s[:, None]
    elif isinstance(producer, nn.modules.conv._ConvTransposeNd):
        g = producer.groups
        cin, cout_g = w.shape[0], w.shape[1]
        k = w.shape[2:]
        w = w.view(g, cin // g, cout_g, *k) * s.view(g, 1, cout_g, *([1] * len(k)))
        w = w.reshape(cin, cout_g, *k)
    else:  # Conv: output channels on axis 0 whatever the groups
        w = w * s.view(-1, *([1] * (w.dim() - 1)))
    b = producer.bias.detach().double() if producer.bias is not None else torch.zeros_like(s)
    b = b * s + t  # (b - mu) * s + beta
    weight.copy_(w.to(weight.dtype))
    if producer.bias is not None:
        producer.bias.copy_(b.to(producer.bias.dtype))
    else:
        producer.bias = nn.Parameter(b.to(device=weight.device, dtype=weight.dtype))


def _producer_problem(producer: nn.Module) -> str | None:
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(producer):
        return "its producer's weight is parametrized (weight_norm/spectral_norm)"
    if not producer.weight.is_floating_point():
        return "its producer's weight is not floating point"
    return None


def fold_model(model: nn.Module, example_inputs: Sequence[Tensor] | None = None) -> FoldResult:
    """Fold every inference-form BatchNorm / Batch Renorm / frozen BatchNorm layer of a copy of `model` into
    its producer.

    The input model is not modified: the work happens on a deep copy, returned in eval mode (the folded
    weights are only valid for inference). Pass `example_inputs` (a tuple of tensors for ``model(*inputs)``)
    so that Linear + BatchNorm1d pairs can be confirmed by shape; without it they are kept, with that
    reason. Raises :class:`brn_cli.deploy.graph.TraceError` (naming the module) when torch.fx cannot trace the model.
    """
    work = copy.deepcopy(model).eval()
    gm = trace(work)  # shares submodules with `work`, so folding them edits `work`
    sites: list[FoldSite] = find_fold_sites(work, example_inputs, gm=gm)
    result = FoldResult(model=work)
    # Norms that hold running stats but never appear in the traced graph (unused) stay as they are.
    for site in sites:
        norm = work.get_submodule(site.norm)
        problem = _unknown_behaviour(norm)
        if problem is not None:
            result.kept.append((site.norm, problem))
            continue
        drop, act = _remainder(norm)
        reason = site.reason
        if site.producer is not None:
            producer = work.get_submodule(site.producer)
            reason = _producer_problem(producer)
            if reason is None:
                _fold_into(producer, norm)
                rest: nn.Module = (
                    nn.Identity()
                    if drop is None and act is None
                    else _DropAct(drop or nn.Identity(), act or nn.Identity())
                )
                set_submodule(work, site.norm, rest)
                result.folded.append((site.norm, site.producer))
                continue
        s, t = norm_scale_shift(norm)
        dtype = norm.running_mean.dtype
        set_submodule(work, site.norm, ChannelScaleShift(s.to(dtype), t.to(dtype), drop, act))
        result.kept.append((site.norm, reason or "no foldable producer"))
    for name, module in work.named_modules():
        if is_torch_batch_norm(module) and not has_running_stats(module):
            result.kept.append(
                (name, "no running statistics: normalizes with batch statistics at inference; left unchanged")
            )
    return result
