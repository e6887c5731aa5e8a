"""BatchNorm -> Batch Renormalization, leaving eval-mode outputs unchanged.

The renorm layer keeps nn.BatchNorm's state layout, so conversion copies weight, bias, running_mean,
running_var and num_batches_tracked without arithmetic; the inference function is the same expression,
evaluated by the same kernel. What conversion changes is training: renorm starts with rmax=1, dmax=0
(plain batchnorm) until a schedule relaxes the limits.

Which modules convert:
  * nn.BatchNorm1d/2d/3d and nn.SyncBatchNorm (and subclasses that do not override ``forward``);
  * timm's BatchNormAct2d / SyncBatchNormAct -> :class:`~brn_cli.nn.layer.BatchRenormAct`, keeping their
    dropout and activation children;
  * frozen BatchNorms (torchvision's and timm's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d), only when
    asked (``frozen``): they are a fixed affine map with BatchNorm's buffers (no ``num_batches_tracked``),
    which a detector uses because its batches are too small for BatchNorm;
  * torchrl's ``BatchRenorm1d`` and sb3-contrib's ``BatchRenorm`` (CrossQ critics), unless ``peers=False``:
    their variance, eps, momentum, affine parameters and step counter carry over (:mod:`brn_cli.nn.peers`),
    and the limits are theirs once their warm-up is over;
  * skipped, with the reason: layers without running statistics, subclasses that override ``forward`` with
    behaviour brn does not know, names excluded by the user's globs, frozen norms kept frozen.

``frozen`` says what happens to frozen norms:
  * ``"keep"`` (default): they stay frozen BatchNorms, listed as skipped with the way to convert them;
  * ``"convert"``: they become trainable renorm layers, except in frozen stages: a frozen norm whose
    producer (the nearest convolution or linear layer before it in module order, the layer a torchvision
    backbone freezes with it) has no trainable parameter stays a frozen BatchNorm, which is exactly a renorm
    layer whose parameters and statistics never move;
  * ``"convert-all"``: every frozen norm becomes a trainable renorm layer, frozen stages included.

A layer selected for conversion whose running statistics hold NaN or inf (or a negative variance), or
whose eps is not > 0, is refused with its name before anything is replaced: renorm trains from those
statistics and divides by sigma_B = sqrt(var_B + eps).
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from brn_cli.errors import BrnError, VerificationError, first_line
from brn_cli.nn.layer import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    BatchRenormAct,
    BatchRenormNd,
    describe_bad_running_stats,
)
from brn_cli.nn.norms import (
    frozen_norm_has_act,
    is_batch_norm,
    is_frozen_batch_norm,
    is_peer_renorm,
    is_renorm,
    is_timm_norm_act,
    is_torch_batch_norm,
    norm_channels,
    renorm_layers,
    runs_torch_batch_norm_forward,
    set_submodule,
)
from brn_cli.nn.outputs import flat_outputs
from brn_cli.nn.peers import (
    describe_peer,
    peer_label,
    peer_skip_reason,
    peer_statistics,
    renorm_from_peer,
)

_PLAIN_TARGETS: dict[type, type[BatchRenormNd]] = {
    nn.BatchNorm1d: BatchRenorm1d,
    nn.BatchNorm2d: BatchRenorm2d,
    nn.BatchNorm3d: BatchRenorm3d,
    nn.SyncBatchNorm: BatchRenormNd,
}
FROZEN_MODES = ("keep", "convert", "convert-all")
_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)
_LAYER_TYPES: dict[str, type[BatchRenormNd]] = {
    cls.__name__: cls for cls in (BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, BatchRenormNd, BatchRenormAct)
}


@dataclass
class LayerDecision:
    """What conversion does (or did) with one normalization module."""

    name: str
    source_type: str
    num_features: int
    action: str  # "convert" or "skip"
    target_type: str | None = None
    reason: str | None = None
    frozen: bool = False  # the source is a frozen BatchNorm (FrozenBatchNorm2d)
    peer: bool = False  # the source is torchrl's or sb3-contrib's Batch Renorm layer
    peer_position: str | None = None  # a peer's warm-up position, in words (brn_cli.nn.peers.describe_peer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _target_for(module: _BatchNorm) -> tuple[type[BatchRenormNd] | None, str | None]:
    """The renorm class for `module`, or (None, reason it is skipped)."""
    if not module.track_running_stats or module.running_mean is None or module.running_var is None:
        return None, "no running statistics (track_running_stats=False): nothing to renormalize towards"
    if is_timm_norm_act(module):
        return BatchRenormAct, None
    for base, target in _PLAIN_TARGETS.items():
        if isinstance(module, base):
            if not runs_torch_batch_norm_forward(module):
                return None, (
                    f"{type(module).__qualname__} overrides forward(); converting would drop its behaviour"
                )
            return target, None
    return None, f"unknown BatchNorm variant {type(module).__qualname__}"


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> str | None:
    if include and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
        return "not matched by `include`"
    if exclude and any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
        return "matched by `exclude`"
    return None


def check_frozen_mode(frozen: str) -> str:
    """`frozen` if it is one of :data:`FROZEN_MODES`, else BrnError naming the parameter."""
    if frozen not in FROZEN_MODES:
        raise BrnError(f"`frozen` must be one of {', '.join(FROZEN_MODES)}, got {frozen!r}", param="frozen")
    return frozen


def _frozen_target(
    module: nn.Module, frozen: str, producer: tuple[str, nn.Module] | None
) -> tuple[type[BatchRenormNd] | None, str | None]:
    """The renorm class for a frozen BatchNorm under `frozen`, or (None, why it stays frozen)."""
    kind = type(module).__name__
    if not all(isinstance(getattr(module, k, None), torch.Tensor) for k in ("running_mean", "running_var")):
        return None, f"{kind} without running_mean / running_var buffers: not a BatchNorm brn knows"
    if frozen == "keep":
        return None, f"frozen norm ({kind}) kept frozen; `frozen=convert` converts it"
    if frozen == "convert" and producer is not None and _frozen_producer(producer[1]):
        return None, (
            f"frozen norm in a frozen stage ({producer[0]!r} has no trainable parameter): kept frozen; "
            "`frozen=convert-all` converts it too"
        )
    return (BatchRenormAct if frozen_norm_has_act(module) else BatchRenorm2d), None


def _frozen_producer(producer: nn.Module) -> bool:
    params = list(producer.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def plan_conversion(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    frozen: str = "keep",
    peers: bool = True,
) -> list[LayerDecision]:
    """Decide, for every BatchNorm module of `model` (frozen BatchNorms and torchrl's / sb3-contrib's Batch
    Renorm layers included), whether it converts and to what. `frozen` is "keep", "convert" or "convert-all"
    (see the module docstring); `peers` False keeps the torchrl / sb3-contrib layers."""
    check_frozen_mode(frozen)
    decisions = []
    producer: tuple[str, nn.Module] | None = None  # the last conv / linear before a norm, in module order
    for name, module in model.named_modules():
        if isinstance(module, _PRODUCERS):
            producer = (name, module)
        is_frozen, is_peer = is_frozen_batch_norm(module), is_peer_renorm(module)
        if not (is_frozen or is_peer or is_torch_batch_norm(module)):
            continue
        if is_peer:
            target, reason = _peer_target(module, peers)
        else:
            target, reason = _frozen_target(module, frozen, producer) if is_frozen else _target_for(module)
        if target is not None:
            reason = _selected(name, include, exclude)
        decisions.append(
            LayerDecision(
                name=name,
                source_type=peer_label(module) if is_peer else type(module).__name__,
                num_features=norm_channels(module) if is_peer or hasattr(module, "running_mean") else 0,
                action="convert" if reason is None else "skip",
                target_type=target.__name__ if reason is None and target is not None else None,
                reason=reason,
                frozen=is_frozen,
                peer=is_peer,
                peer_position=describe_peer(module) if is_peer else None,
            )
        )
    return decisions


def _peer_target(module: nn.Module, peers: bool) -> tuple[type[BatchRenormNd] | None, str | None]:
    """brn's class for a torchrl / sb3-contrib Batch Renorm layer, or (None, why it is kept)."""
    if not peers:
        return None, f"{peer_label(module)} kept (`peers=False`); `peers=True` converts it"
    reason = peer_skip_reason(module)
    return (None, reason) if reason is not None else (BatchRenorm1d, None)


def _unusable(bn: _BatchNorm) -> str | None:
    """Why a renorm layer cannot start from `bn` (and what to do), or None."""
    eps = float(bn.eps)
    if not (math.isfinite(eps) and eps > 0.0):
        return (
            f"eps is {eps:g}; batch renorm needs eps > 0 (it divides by sqrt(batch variance + eps)): "
            "build the model with a positive eps, e.g. 1e-5"
        )
    mean, var = peer_statistics(bn) if is_peer_renorm(bn) else (bn.running_mean, bn.running_var)
    problem = describe_bad_running_stats(mean, var)
    if problem is not None:
        return f"{problem}; fix or recalibrate the source (brn calibrate)"
    return None


def check_convertible(model: nn.Module, decisions: Sequence[LayerDecision]) -> None:
    """Raise BrnError naming the first layer set to convert whose eps or running statistics a renorm
    layer cannot use (NaN, inf, a negative variance, eps <= 0), and how many more there are."""
    bad = []
    for decision in decisions:
        if decision.action != "convert":
            continue
        bn = model.get_submodule(decision.name) if decision.name else model
        reason = _unusable(bn)
        if reason is not None:
            bad.append((decision.name or type(bn).__name__, reason))
    if not bad:
        return
    (name, reason), others = bad[0], [n for n, _ in bad[1:]]
    what, _, advice = reason.partition("; ")
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        what += f" (and {len(others)} more layer{'s' if len(others) > 1 else ''}: {shown})"
    raise BrnError(f"{name}: {what}; {advice}")


def plan_checked(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    frozen: str = "keep",
    source: str = "the model",
    require_conversion: bool = True,
    peers: bool = True,
) -> list[LayerDecision]:
    """:func:`plan_conversion`, refusing in one line (naming `source`) a model with no BatchNorm layer to
    convert, a plan that skips every layer (unless `require_conversion` is False: a dry run shows why; a
    model of frozen norms kept frozen is told how many and how to convert them), and a layer a renorm layer
    cannot start from (:func:`check_convertible`)."""
    decisions = plan_conversion(model, include=include, exclude=exclude, frozen=frozen, peers=peers)
    if not decisions:
        raise BrnError(
            f"{source}: the model has no BatchNorm layers with running statistics; nothing to convert"
        )
    if require_conversion and not any(d.action == "convert" for d in decisions):
        raise BrnError(_nothing_converted(decisions, frozen))
    check_convertible(model, decisions)
    return decisions


def _nothing_converted(decisions: Sequence[LayerDecision], frozen: str) -> str:
    frozen_kept = [d for d in decisions if d.frozen]
    if frozen == "keep" and len(frozen_kept) == len(decisions):
        kinds = ", ".join(sorted({d.source_type for d in frozen_kept}))
        return (
            f"no layer converted: the model's {len(frozen_kept)} norms are frozen ({kinds}) and were kept "
            "frozen; pass `frozen=convert` to convert them (norms in frozen stages stay frozen) or "
            "`frozen=convert-all` to convert every one"
        )
    reasons = sorted({d.reason for d in decisions if d.reason})
    return f"no layer converted: all {len(decisions)} skipped ({'; '.join(reasons)})"


def renorm_from_batchnorm(
    bn: _BatchNorm,
    target: type[BatchRenormNd],
    *,
    momentum: float,
    rmax: float | None = None,
    dmax: float | None = None,
) -> BatchRenormNd:
    """A renorm layer with `bn`'s parameters and statistics (copied, not recomputed)."""
    ref = bn.running_mean
    kwargs: dict[str, Any] = {
        "eps": bn.eps,
        "momentum": momentum,
        "rmax": rmax,
        "dmax": dmax,
        "affine": bn.affine,
        "device": ref.device,
        "dtype": ref.dtype,
    }
    if target is BatchRenormAct:
        layer = BatchRenormAct(bn.num_features, drop=bn.drop, act=bn.act, **kwargs)
    else:
        layer = target(bn.num_features, **kwargs)
    with torch.no_grad():
        if bn.affine:
            layer.weight.copy_(bn.weight)
            layer.bias.copy_(bn.bias)
        layer.running_mean.copy_(bn.running_mean)
        layer.running_var.copy_(bn.running_var)
        if bn.num_batches_tracked is not None:
            layer.num_batches_tracked.copy_(bn.num_batches_tracked)
    if bn.affine:
        layer.weight.requires_grad_(bn.weight.requires_grad)
        layer.bias.requires_grad_(bn.bias.requires_grad)
    layer.train(bn.training)
    return layer


def renorm_from_frozen(
    norm: nn.Module,
    target: type[BatchRenormNd],
    *,
    momentum: float,
    rmax: float | None = None,
    dmax: float | None = None,
) -> BatchRenormNd:
    """A trainable renorm layer with a frozen BatchNorm's buffers and eps (copied, not recomputed): the same
    eval function, now with parameters that train and statistics that move."""
    ref = norm.running_mean
    kwargs: dict[str, Any] = {"eps": float(norm.eps), "momentum": momentum, "rmax": rmax, "dmax": dmax}
    kwargs.update(affine=True, device=ref.device, dtype=ref.dtype)
    if target is BatchRenormAct:
        layer = BatchRenormAct(ref.numel(), drop=norm.drop, act=norm.act, **kwargs)
    else:
        layer = target(ref.numel(), **kwargs)
    with torch.no_grad():
        layer.weight.copy_(norm.weight)
        layer.bias.copy_(norm.bias)
        layer.running_mean.copy_(norm.running_mean)
        layer.running_var.copy_(norm.running_var)
    layer.train(norm.training)
    return layer


def convert_batchnorm(
    model: nn.Module,
    *,
    momentum: float = 0.01,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    rmax: float | None = None,
    dmax: float | None = None,
    frozen: str = "keep",
    peers: bool = True,
) -> nn.Module:
    """Replace BatchNorm modules of `model` by Batch Renorm in place; returns `model`.

    Eval-mode outputs are unchanged. `include` / `exclude` are fnmatch globs on module names
    (``layer1.*``). The new layers start at rmax=1, dmax=0 (batchnorm) unless told otherwise (and warn
    at their first training forward if nothing, e.g. a RenormScheduler, set their limits by then); `momentum`
    is the paper's alpha. Use :func:`plan_conversion` to see what would convert and why not.
    Frozen BatchNorms (torchvision's FrozenBatchNorm2d in detectors) stay as they are unless `frozen` is
    "convert" (trainable renorm layers, except in stages whose convolutions are frozen) or "convert-all".
    torchrl's ``BatchRenorm1d`` and sb3-contrib's ``BatchRenorm`` (CrossQ critics) become BatchRenorm1d
    unless `peers` is False: statistics (their variance is brn's running_var), eps, their own momentum (not
    `momentum`: theirs already is the renorm rate, in the same convention), affine parameters and step
    counter carry over, and once their warm-up is over they keep their limits; read the warm-up position
    with :func:`brn_cli.nn.peers.peer_schedule` *before* converting to continue it with a scheduler.
    A model that is itself a BatchNorm module is returned as a new renorm module. A layer set to convert
    whose eps or running statistics renorm cannot use raises BrnError naming it, with `model` untouched.

    Example::

        >>> import torch
        >>> from torchvision.ops.misc import FrozenBatchNorm2d
        >>> from brn_cli import convert_batchnorm
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8))
        >>> type(convert_batchnorm(model, frozen="convert")[1]).__name__
        'BatchRenorm2d'
    """
    decisions = plan_conversion(model, include=include, exclude=exclude, frozen=frozen, peers=peers)
    check_convertible(model, decisions)
    for decision in decisions:
        if decision.action != "convert":
            continue
        bn = model.get_submodule(decision.name) if decision.name else model
        target = _LAYER_TYPES[decision.target_type]
        if decision.peer:
            new = renorm_from_peer(bn, target, rmax=rmax, dmax=dmax)
        else:
            build = renorm_from_frozen if decision.frozen else renorm_from_batchnorm
            new = build(bn, target, momentum=momentum, rmax=rmax, dmax=dmax)
        if not decision.name:
            return new
        set_submodule(model, decision.name, new)
    return model


def apply_renorm_layout(model: nn.Module, layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Re-create the renorm layers recorded in a brn checkpoint on a freshly built architecture."""
    for name, settings in layers.items():
        try:
            bn = model.get_submodule(name)
        except AttributeError:
            raise BrnError(
                f"checkpoint records renorm layer {name!r}, which the architecture lacks"
            ) from None
        if not (is_torch_batch_norm(bn) or is_frozen_batch_norm(bn) or is_peer_renorm(bn)):
            raise BrnError(
                f"checkpoint records renorm layer {name!r}, but the architecture has a "
                f"{type(bn).__name__} there"
            )
        target = _LAYER_TYPES.get(settings.get("type", ""))
        if target is None:
            raise BrnError(f"checkpoint layer {name!r} has unknown type {settings.get('type')!r}")
        build = renorm_from_frozen if is_frozen_batch_norm(bn) else renorm_from_batchnorm
        build = renorm_from_peer if is_peer_renorm(bn) else build
        try:
            new = build(
                bn,
                target,
                momentum=float(settings["momentum"]),
                rmax=float(settings["rmax"]),
                dmax=float(settings["dmax"]),
            )
            new.eps = float(settings.get("eps", new.eps))
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"no {exc.args[0]!r} setting" if isinstance(exc, KeyError) else str(exc)
            raise BrnError(f"checkpoint layer {name!r}: {detail}") from None
        set_submodule(model, name, new)
    return model


def restore_batchnorm(model: nn.Module) -> nn.Module:
    """The inverse of conversion: every renorm layer back to the matching nn.BatchNorm, in place.

    Keeps the eval-mode function exactly (same buffers, same kernel). A renorm layer carrying an activation
    (from timm's BatchNormAct2d) comes back as timm's BatchNormAct2d when timm is installed.
    """
    back = {
        BatchRenorm1d: nn.BatchNorm1d,
        BatchRenorm2d: nn.BatchNorm2d,
        BatchRenorm3d: nn.BatchNorm3d,
        BatchRenormNd: nn.SyncBatchNorm,
    }
    for name, module in renorm_layers(model):
        ref = module.running_mean
        kwargs = {
            "eps": module.eps,
            "momentum": module.momentum,
            "affine": module.affine,
            "device": ref.device,
            "dtype": ref.dtype,
        }
        if isinstance(module, BatchRenormAct):
            from timm.layers.norm_act import BatchNormAct2d

            bn = BatchNormAct2d(module.num_features, **kwargs)
            bn.drop, bn.act = module.drop, module.act
        else:
            bn = back[type(module)](module.num_features, **kwargs)
        bn.load_state_dict(module.state_dict(), strict=False)
        bn.train(module.training)
        if not name:
            return bn
        set_submodule(model, name, bn)
    return model


# ----------------------------------------------------------------------------------------------
# Checking that conversion left the inference function alone
# ----------------------------------------------------------------------------------------------


def infer_input_shape(model: nn.Module, batch: int = 2, arch_spec: str | None = None) -> list[int] | None:
    """Guess an input shape: channels from the first Conv/Linear module (module order: only a guess), the
    image size from the architecture's own metadata where it has some (timm's ``pretrained_cfg``,
    torchvision's weight presets: 240 for efficientnet_b1, 299 for inception_v3), else a default."""
    shape = _shape_from_first_module(model, batch)
    size = _architecture_image_size(model, arch_spec)
    if shape is not None and size is not None and len(shape) in (4, 5):
        shape[-2:] = list(size)
    return shape


def _shape_from_first_module(model: nn.Module, batch: int) -> list[int] | None:
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
            return [batch, module.in_channels, 64]
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            side = 224 if module.in_channels == 3 else 32
            return [batch, module.in_channels, side, side]
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            return [batch, module.in_channels, 8, 64, 64]
        if isinstance(module, nn.Linear):
            return [batch, module.in_features]
        if is_batch_norm(module):
            if isinstance(module, (nn.BatchNorm1d, BatchRenorm1d)):
                return [batch, module.num_features]
            return None
    return None


def _architecture_image_size(model: nn.Module, arch_spec: str | None) -> tuple[int, int] | None:
    """(H, W) the architecture is meant for, from metadata that ships with the code (nothing is fetched)."""
    cfg = getattr(model, "pretrained_cfg", None)  # timm models carry their default input size
    if isinstance(cfg, dict):
        size = cfg.get("input_size")
        if isinstance(size, (tuple, list)) and len(size) >= 3:
            return int(size[-2]), int(size[-1])
    if arch_spec and arch_spec.startswith("torchvision:"):
        try:
            from torchvision.models import get_model_weights

            preset = get_model_weights(arch_spec.split(":", 1)[1]).DEFAULT.transforms
            crop = preset.keywords["crop_size"]
        except Exception:  # no weights registered, another preset, or no torchvision: fall back to a default
            return None
        crop = list(crop) if isinstance(crop, (tuple, list)) else [crop]
        return (int(crop[0]), int(crop[-1])) if crop else None
    return None


@torch.no_grad()
def max_eval_difference(
    original: nn.Module, converted: nn.Module, input_shape: Sequence[int], *, seed: int = 0
) -> float:
    """Largest |difference| between the eval-mode outputs of two models on one random input.

    Every tensor of any nesting of lists, tuples and dicts is compared (:func:`brn_cli.nn.outputs.flat_outputs`);
    ``inf`` when the two return different numbers or shapes of tensors (:func:`eval_output_mismatch` says how),
    ``nan`` when neither returns a tensor. Two empty tensors of one shape (a detector that found no boxes)
    are equal.
    """
    a, b = _eval_outputs(original, converted, input_shape, seed=seed)
    if not a and not b:
        return float("nan")
    if output_mismatch(a, b) is not None:
        return float("inf")
    return max((_tensor_difference(u, v) for u, v in zip(a, b, strict=True)), default=0.0)


def eval_output_mismatch(
    original: nn.Module, converted: nn.Module, input_shape: Sequence[int], *, seed: int = 0
) -> str | None:
    """Why the two models' eval outputs cannot be compared element by element (their tensor counts or shapes
    differ), or None when they line up; the input is :func:`max_eval_difference`'s."""
    return output_mismatch(*_eval_outputs(original, converted, input_shape, seed=seed))


def output_mismatch(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> str | None:
    """One line saying where two flat output lists differ in structure, or None when count and shapes agree."""
    if len(a) != len(b):
        return f"the models return {len(a)} and {len(b)} output tensors"
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        if u.shape != v.shape:
            return (
                f"output tensor {i} has shape {list(u.shape)} in one model and {list(v.shape)} in the other"
            )
    return None


def _tensor_difference(u: torch.Tensor, v: torch.Tensor) -> float:
    if u.numel() == 0:
        return 0.0
    return float((u.double() - v.double()).abs().max())


def _eval_outputs(
    original: nn.Module, converted: nn.Module, input_shape: Sequence[int], *, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ref = next((p for p in original.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.randn(*input_shape, generator=gen, dtype=dtype)
    was = original.training, converted.training
    original.eval()
    converted.eval()
    try:
        with torch.no_grad():
            return flat_outputs(original(x)), flat_outputs(converted(x))
    finally:
        original.train(was[0])
        converted.train(was[1])


@dataclass
class CheckedConversion:
    """A converted model, and the check that its eval outputs are the original's."""

    model: nn.Module
    input_shape: list[int]
    max_abs_diff: float


def _converted_frozen(original: nn.Module, converted: nn.Module) -> bool:
    """Whether conversion replaced a frozen BatchNorm or a torchrl / sb3-contrib Batch Renorm layer of
    `original` (a whole-model swap included): they compute the eval function with their own expression."""
    frozen = {name for name, m in original.named_modules() if is_frozen_batch_norm(m) or is_peer_renorm(m)}
    return any(is_renorm(m) for name, m in converted.named_modules() if name in frozen)


@torch.no_grad()
def _largest_output(model: nn.Module, input_shape: Sequence[int], *, seed: int = 0) -> float:
    """The largest |output| of `model` in eval mode on the random input :func:`max_eval_difference` uses."""
    ref = next((p for p in model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    was = model.training
    model.eval()
    try:
        outputs = flat_outputs(model(x))
    finally:
        model.train(was)
    return max((float(t.detach().float().abs().max()) for t in outputs if t.numel()), default=0.0)


def convert_checked(
    model: nn.Module,
    *,
    input_shape: Sequence[int] | None = None,
    arch_spec: str | None = None,
    momentum: float = 0.01,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    frozen: str = "keep",
    tolerance: float = 1e-5,
    peers: bool = True,
) -> CheckedConversion:
    """:func:`convert_batchnorm` (in place), then check that eval outputs did not change: the original and the
    converted model run on one random input of `input_shape` (default: :func:`infer_input_shape`, helped by
    `arch_spec`); `frozen` and `peers` as for :func:`convert_batchnorm`. A converted BatchNorm computes the same
    expression with the same kernel, so any difference beyond `tolerance` is a conversion bug:
    VerificationError. A converted frozen norm (or torchrl / sb3-contrib layer) computes it with BatchNorm's
    kernel instead of its own expression (``x * scale + shift``): rounding differs by an ulp or so per layer,
    so `tolerance` is then relative to the largest output. BrnError when
    no shape is known or the model does not run on it."""
    original = copy.deepcopy(model)
    converted = convert_batchnorm(
        model, momentum=momentum, include=include, exclude=exclude, frozen=frozen, peers=peers
    )
    shape = list(input_shape) if input_shape else infer_input_shape(converted, arch_spec=arch_spec)
    if shape is None:
        raise BrnError("cannot infer an input shape from the first layer; pass `input_shape`")
    try:
        diff = max_eval_difference(original, converted, shape)
    except Exception as exc:
        raise BrnError(
            f"the model does not run on input shape {shape} ({type(exc).__name__}: {first_line(exc)}); "
            "pass `input_shape`"
        ) from None
    if not diff <= tolerance and _converted_frozen(original, converted):
        tolerance *= max(1.0, _largest_output(original, shape))
    if not diff <= tolerance:
        raise VerificationError(f"conversion changed eval outputs by {diff:.3g} (expected 0)")
    return CheckedConversion(model=converted, input_shape=shape, max_abs_diff=diff)
