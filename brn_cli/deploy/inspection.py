"""`brn inspect`: what a checkpoint holds and what its normalization layers look like."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from brn_cli.deploy.graph import TraceError, find_fold_sites
from brn_cli.nn.convert import LayerDecision, infer_input_shape, plan_conversion
from brn_cli.nn.norms import (
    folds_as_batch_norm,
    is_frozen_batch_norm,
    is_inspected_norm,
    is_peer_renorm,
    is_per_example_norm,
    is_renorm,
    norm_channels,
)
from brn_cli.nn.peers import PeerSchedule, peer_label, peer_schedule, peer_statistics
from brn_cli.storage.checkpoint import LoadedCheckpoint


@dataclass
class NormReport:
    name: str
    type: str
    channels: int | None
    eps: float | None
    momentum: float | None
    rmax: float | None = None
    dmax: float | None = None
    fold_into: str | None = None
    fold_reason: str | None = None
    health: str = "ok"  # "ok", "no running stats", or what is wrong
    frozen: bool = False  # a frozen BatchNorm (FrozenBatchNorm2d): a fixed affine map, no trainable parameter
    on_convert: str | None = None  # what `brn convert` would do with it (frozen norms: under each `frozen`)


@dataclass
class InspectReport:
    path: str
    file_format: str
    top_level_keys: list[str]
    arch: str | None
    parameters: int
    input_shape: list[int] | None
    norms: list[NormReport] = field(default_factory=list)
    trace_error: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # The torchrl / sb3-contrib warm-up positions a converted checkpoint records: each entry as recorded
    # (layers, library, start_step, warmup_steps, rmax, dmax, ramp) with its description.
    peer_warmup: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stats_health(module: nn.Module) -> str:
    """'ok', 'no running stats', or a description of NaN/inf/negative running statistics."""
    mean = getattr(module, "running_mean", None)
    var = getattr(module, "running_var", None)
    if is_peer_renorm(module):  # sb3-contrib names them ra_mean / ra_var
        mean, var = peer_statistics(module)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return "no running stats"
    problems = []
    for label, t in (("mean", mean), ("var", var)):
        if torch.isnan(t).any():
            problems.append(f"{int(torch.isnan(t).sum())} NaN in running_{label}")
        if torch.isinf(t).any():
            problems.append(f"{int(torch.isinf(t).sum())} inf in running_{label}")
    negative = int((var < 0).sum())
    if negative:
        problems.append(f"{negative} negative running_var")
    return "; ".join(problems) if problems else "ok"


def _current_limits(module: nn.Module) -> dict[str, float | None]:
    """rmax and dmax a renorm layer (brn's, or torchrl's / sb3-contrib's at its warm-up position) uses now."""
    if is_renorm(module):
        return {"rmax": float(module.rmax), "dmax": float(module.dmax)}
    if is_peer_renorm(module):
        rmax, dmax = peer_schedule(module).limits()
        return {"rmax": rmax, "dmax": dmax}
    return {"rmax": None, "dmax": None}


def _convert_outcome(decision: LayerDecision) -> str:
    return decision.target_type if decision.action == "convert" else f"skipped: {decision.reason}"


def conversion_outcomes(model: nn.Module) -> dict[str, str]:
    """What conversion would do with each BatchNorm-like layer of `model`, by name: the target or why it is
    skipped; for frozen norms, the outcome under each `frozen` mode."""
    plans = {mode: plan_conversion(model, frozen=mode) for mode in ("keep", "convert", "convert-all")}
    outcomes = {}
    for i, decision in enumerate(plans["keep"]):
        if decision.peer and decision.action == "convert":
            outcomes[decision.name] = f"{decision.target_type}, {decision.peer_position}"
            continue
        if not decision.frozen:
            outcomes[decision.name] = _convert_outcome(decision)
            continue
        convert, convert_all = plans["convert"][i], plans["convert-all"][i]
        if convert.action == "convert" or convert_all.action != "convert":
            converted = f"`frozen=convert`: {_convert_outcome(convert)}"
        else:
            converted = f"`frozen=convert`: kept frozen (frozen stage); `frozen=convert-all`: {convert_all.target_type}"
        outcomes[decision.name] = f"kept frozen by default; {converted}"
    return outcomes


def recorded_peer_warmup(ckpt: LoadedCheckpoint) -> list[dict[str, Any]]:
    """The warm-up positions `ckpt` records for its converted torchrl / sb3-contrib layers (checked when it
    was loaded), each with a ``description`` (:meth:`PeerSchedule.describe`)."""
    entries = (ckpt.peer_schedule or {}).get("positions") or []
    return [{**entry, "description": PeerSchedule.from_dict(entry).describe()} for entry in entries]


def inspect_model(ckpt: LoadedCheckpoint, input_shape: list[int] | None = None) -> InspectReport:
    """Describe every normalization layer of a loaded checkpoint, with its fold decision and health."""
    model = ckpt.model
    shape = input_shape or ckpt.input_shape or infer_input_shape(model, arch_spec=ckpt.arch_spec)
    report = InspectReport(
        path=str(ckpt.path),
        file_format=ckpt.file_format,
        top_level_keys=ckpt.top_level_keys,
        arch=ckpt.arch_spec,
        parameters=sum(p.numel() for p in model.parameters()),
        input_shape=list(shape) if shape else None,
        provenance=ckpt.provenance,
        peer_warmup=recorded_peer_warmup(ckpt),
    )
    sites = {}
    try:
        example = [torch.randn(*shape)] if shape else None
        sites = {s.norm: s for s in find_fold_sites(model, example)}
    except TraceError as exc:
        report.trace_error = str(exc)
    except Exception as exc:  # shape propagation failed on the guessed input: retry without shapes
        try:
            sites = {s.norm: s for s in find_fold_sites(model, None)}
        except TraceError as exc2:
            report.trace_error = str(exc2)
        else:
            report.trace_error = f"shape propagation failed ({type(exc).__name__}); Linear folds unconfirmed"

    outcomes = conversion_outcomes(model)
    for name, module in model.named_modules():
        if not is_inspected_norm(module):
            continue
        channels = getattr(module, "num_features", None) or getattr(module, "num_channels", None)
        if channels is None and folds_as_batch_norm(module):
            channels = norm_channels(module)
        if channels is None and isinstance(module, nn.LayerNorm):
            channels = int(math.prod(module.normalized_shape))
        momentum = getattr(module, "momentum", None)
        norm = NormReport(
            name=name,
            type=peer_label(module) if is_peer_renorm(module) else type(module).__name__,
            channels=int(channels) if channels is not None else None,
            eps=float(module.eps) if hasattr(module, "eps") else None,
            momentum=float(momentum) if momentum is not None else None,
            **_current_limits(module),
            health=stats_health(module),
            frozen=is_frozen_batch_norm(module),
            on_convert=outcomes.get(name),
        )
        site = sites.get(name)
        if site is not None:
            norm.fold_into, norm.fold_reason = site.producer, site.reason
        elif norm.health == "no running stats":
            norm.fold_reason = "no running statistics (normalizes with batch statistics at inference)"
        elif is_per_example_norm(module):
            norm.fold_reason = f"{type(module).__name__} normalizes per example: not a fixed affine map"
        elif is_peer_renorm(module):
            norm.fold_reason = "folds as BatchNorm once converted (brn convert)"
        elif report.trace_error:
            norm.fold_reason = "graph not traced"
        else:
            norm.fold_reason = "not reached in the traced graph"
        report.norms.append(norm)
    return report
