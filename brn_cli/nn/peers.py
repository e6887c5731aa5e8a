r"""Batch Renorm layers of other libraries -> brn's, eval outputs unchanged, warm-up position kept.

CrossQ critics (Bhatt et al., ICLR 2024) are trained with torchrl's ``BatchRenorm1d``
(``torchrl.modules.BatchRenorm1d``) or sb3-contrib's ``BatchRenorm`` / ``BatchRenorm1d``
(``sb3_contrib.common.torch_layers``). Both compute at inference what brn does,
``y = gamma * (x - mean) / sqrt(var + eps) + beta``, from a stored variance: brn keeps
``sigma = sqrt(running_var + eps)`` in BatchNorm's layout, so their variance is copied into ``running_var``
as it is, with their eps, and the eval function stays the same. What changes is training from then on: brn
averages sigma (from the biased batch variance), they average the Bessel-corrected variance; see
docs/own-loop.md, "Coming from torchrl or sb3-contrib", for every difference.

Their warm-up (plain BatchNorm for W training forwards, then rmax / dmax at once) is read as a schedule
position (:func:`peer_schedule`) that a :class:`~brn_cli.train.schedule.RenormScheduler` continues; a
converted checkpoint keeps it as plain data (:func:`peer_record`, read back by :func:`recorded_peer_schedule`
and ``RenormScheduler.from_checkpoint``). Neither
library is imported: the layers are recognised by class (:func:`brn_cli.nn.norms.peer_renorm_class`) and
read through their attributes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from brn_cli.errors import BrnError
from brn_cli.nn.layer import BatchRenorm1d, BatchRenormNd
from brn_cli.nn.norms import is_peer_renorm, peer_renorm_class

__all__ = [
    "PeerSchedule",
    "describe_peer",
    "peer_label",
    "peer_limits",
    "peer_record",
    "peer_schedule",
    "peer_skip_reason",
    "peer_statistics",
    "recorded_peer_schedule",
    "renorm_from_peer",
]

# The fields of a position as a checkpoint records it (plain data: loads with weights_only=True).
_RECORD_FIELDS = ("library", "start_step", "warmup_steps", "rmax", "dmax", "ramp")


@dataclass(frozen=True)
class PeerSchedule:
    """Where a torchrl / sb3-contrib layer's warm-up stood, as a brn schedule to continue.

    start_step: training steps the layers have run (their counter: torchrl's ``num_batches_tracked``,
        sb3-contrib's ``steps``); a scheduler started there uses the limits their next step would.
    warmup_steps: BatchNorm steps before the limits open, counted as brn counts them (torchrl: its
        ``warmup_steps``; sb3-contrib: its ``warmup_steps + 1``, since it opens once ``steps > warmup_steps``).
    rmax, dmax: the limits after the warm-up (torchrl's ``max_r`` / ``max_d``, sb3-contrib's 3 and 5).
    ramp: torchrl's ``smooth=True``: the limits grow linearly from BatchNorm to rmax / dmax over the warm-up
        (torchrl interpolates r and d themselves instead; the closest schedule brn has).
    library: "torchrl" or "sb3-contrib".

    Example::

        >>> from brn_cli.nn.peers import PeerSchedule
        >>> position = PeerSchedule(start_step=40, warmup_steps=100, rmax=3.0, dmax=5.0)
        >>> position.scheduler_kwargs()
        {'rmax_spec': '99:1,100:3', 'dmax_spec': '99:0,100:5', 'start_step': 40}
        >>> position.limits_open
        False
    """

    start_step: int
    warmup_steps: int
    rmax: float
    dmax: float
    ramp: bool = False
    library: str = ""

    @property
    def rmax_spec(self) -> str:
        """The rmax schedule as ``RenormScheduler.from_specs`` reads it."""
        return self._spec(1.0, self.rmax)

    @property
    def dmax_spec(self) -> str:
        """The dmax schedule as ``RenormScheduler.from_specs`` reads it."""
        return self._spec(0.0, self.dmax)

    @property
    def limits_open(self) -> bool:
        """Whether the next training step renormalizes (the warm-up is over, or under way for a ramp)."""
        if self.warmup_steps == 0:
            return True
        return self.start_step > 0 if self.ramp else self.start_step >= self.warmup_steps

    def limits(self) -> tuple[float, float]:
        """(rmax, dmax) the next training step uses, on the schedule this position continues."""
        w, s = self.warmup_steps, self.start_step
        if w == 0 or s >= w:
            return self.rmax, self.dmax
        if not self.ramp:
            return 1.0, 0.0
        return 1.0 + (self.rmax - 1.0) * s / w, self.dmax * s / w

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``RenormScheduler.from_specs(model, optimizer=..., **kwargs)`` that continue
        this schedule from this position."""
        return {"rmax_spec": self.rmax_spec, "dmax_spec": self.dmax_spec, "start_step": self.start_step}

    def remaining_specs(self) -> tuple[str, str]:
        """(rmax spec, dmax spec) of a schedule counted from 0 at this position: what a new run (``brn
        finetune``'s `rmax_schedule` / `dmax_schedule`, whose steps start at 0) needs to continue it.

        Example::

            >>> from brn_cli.nn.peers import PeerSchedule
            >>> PeerSchedule(start_step=40, warmup_steps=100, rmax=3.0, dmax=5.0).remaining_specs()
            ('59:1,60:3', '59:0,60:5')
        """
        w, s = self.warmup_steps, self.start_step
        if w == 0 or s >= w:
            return _number(self.rmax), _number(self.dmax)
        if self.ramp:
            r, d = self.limits()
            return (
                f"0:{_number(r)},{w - s}:{_number(self.rmax)}",
                f"0:{_number(d)},{w - s}:{_number(self.dmax)}",
            )
        return f"{w - s - 1}:1,{w - s}:{_number(self.rmax)}", f"{w - s - 1}:0,{w - s}:{_number(self.dmax)}"

    def describe(self) -> str:
        """Where the warm-up stands, in a few words: ``"warm-up step 3 of 6: BatchNorm, then rmax 3, dmax 5"``
        or ``"warm-up over: rmax 3, dmax 5"``."""
        after = f"rmax {self.rmax:g}, dmax {self.dmax:g}"
        if self.warmup_steps == 0 or self.start_step >= self.warmup_steps:
            return f"warm-up over: {after}"
        kind = "limits ramping" if self.ramp else "BatchNorm"
        return f"warm-up step {self.start_step} of {self.warmup_steps}: {kind}, then {after}"

    def to_dict(self) -> dict[str, Any]:
        """The position as plain data, as a converted checkpoint records it (:func:`peer_record`)."""
        return {
            "library": self.library,
            "start_step": self.start_step,
            "warmup_steps": self.warmup_steps,
            "rmax": float(self.rmax),
            "dmax": float(self.dmax),
            "ramp": self.ramp,
        }

    @classmethod
    def from_dict(cls, data: Any) -> PeerSchedule:
        """The position :meth:`to_dict` wrote; BrnError saying what is wrong with anything else."""
        if not isinstance(data, dict) or not set(_RECORD_FIELDS) <= set(data):
            missing = sorted(set(_RECORD_FIELDS) - set(data)) if isinstance(data, dict) else _RECORD_FIELDS
            raise BrnError(f"a peer warm-up position needs {', '.join(missing)}")
        steps = [data["start_step"], data["warmup_steps"]]
        limits = [data["rmax"], data["dmax"]]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in steps):
            raise BrnError(f"a peer warm-up position's steps must be whole numbers >= 0, got {steps}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limits):
            raise BrnError(f"a peer warm-up position's rmax and dmax must be numbers, got {limits}")
        if not (limits[0] >= 1.0 and limits[1] >= 0.0) or not isinstance(data["ramp"], bool):
            raise BrnError(
                f"a peer warm-up position needs rmax >= 1, dmax >= 0, ramp True or False, got {data}"
            )
        return cls(*steps, *map(float, limits), ramp=data["ramp"], library=str(data["library"]))

    def _spec(self, off: float, value: float) -> str:
        w = self.warmup_steps
        if w == 0:
            return _number(value)
        if self.ramp:
            return f"0:{_number(off)},{w}:{_number(value)}"
        return f"{w - 1}:{_number(off)},{w}:{_number(value)}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _library(module: nn.Module) -> str:
    cls = peer_renorm_class(module)
    if cls is None:
        raise BrnError(f"{type(module).__name__} is not a torchrl or sb3-contrib Batch Renorm layer")
    return "torchrl" if cls.__module__.startswith("torchrl") else "sb3-contrib"


def peer_label(module: nn.Module) -> str:
    """The layer's class with its library, as ``torchrl.BatchRenorm1d`` (brn's own class has the same name)."""
    return f"{type(module).__module__.partition('.')[0]}.{type(module).__name__}"


def peer_statistics(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(moving mean, moving variance) of a peer layer: torchrl's running_mean / running_var, sb3-contrib's
    ra_mean / ra_var. The variance is what brn stores as running_var (sigma = sqrt(var + eps))."""
    if _library(module) == "torchrl":
        return module.running_mean, module.running_var
    return module.ra_mean, module.ra_var


def _affine(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(gamma, beta) the layer applies, or None when it applies none (sb3-contrib's affine=False)."""
    if _library(module) == "torchrl":
        return module.weight, module.bias
    return (module.scale, module.bias) if module.affine else None


def _counter(module: nn.Module) -> int:
    name = "num_batches_tracked" if _library(module) == "torchrl" else "steps"
    return int(getattr(module, name))


def peer_limits(module: nn.Module) -> tuple[float, float]:
    """(rmax, dmax) the layer uses once its warm-up is over."""
    if _library(module) == "torchrl":
        return float(module.max_r), float(module.max_d)
    return float(module.rmax), float(module.dmax)


def _position(module: nn.Module) -> PeerSchedule:
    library = _library(module)
    rmax, dmax = peer_limits(module)
    if library == "torchrl":
        warmup = max(int(module.warmup_steps), 0)
        # torchrl renormalizes with factor num_batches_tracked // warmup_steps (or / for smooth) when
        # warmup_steps > 0: BatchNorm while the counter is below warmup_steps.
        ramp = bool(getattr(module, "smooth", False)) and warmup > 0
        return PeerSchedule(_counter(module), warmup, rmax, dmax, ramp=ramp, library=library)
    # sb3-contrib renormalizes once steps > warmup_steps: warmup_steps + 1 BatchNorm steps.
    warmup = max(int(module.warmup_steps) + 1, 0)
    return PeerSchedule(_counter(module), warmup, rmax, dmax, library=library)


def peer_schedule(model: nn.Module) -> PeerSchedule:
    """The warm-up position of the torchrl / sb3-contrib Batch Renorm layers of `model` (read before
    converting them), for a :class:`~brn_cli.train.schedule.RenormScheduler` to continue.

    Every such layer of `model` must be at the same position (they count their own training forwards): a
    CrossQ actor and critic may not be; read and drive each part on its own. BrnError when `model` has no
    such layer or two disagree.

    Example::

        >>> import torch
        >>> from sb3_contrib.common.torch_layers import BatchRenorm1d
        >>> import brn_cli
        >>> critic = torch.nn.Sequential(torch.nn.Linear(4, 8), BatchRenorm1d(8, warmup_steps=100))
        >>> for _ in range(30):
        ...     _ = critic(torch.randn(16, 4))
        >>> position = brn_cli.peer_schedule(critic)  # before converting
        >>> position.start_step, position.warmup_steps, position.limits()
        (30, 101, (1.0, 0.0))
        >>> _ = brn_cli.convert_batchnorm(critic)
        >>> opt = torch.optim.Adam(critic.parameters())
        >>> sched = brn_cli.RenormScheduler.from_specs(critic, optimizer=opt, **position.scheduler_kwargs())
        >>> sched.step, sched.values(101)
        (30, (3.0, 5.0))
    """
    found = [(name, _position(m)) for name, m in model.named_modules() if is_peer_renorm(m)]
    if not found:
        raise BrnError(
            f"the model ({type(model).__name__}) has no torchrl or sb3-contrib Batch Renorm layers (read "
            "their position before converting them)",
            param="model",
        )
    (first_name, first), *rest = found
    for name, position in rest:
        if position != first:
            raise BrnError(
                f"Batch Renorm layers {first_name or '(model)'} and {name} are at different warm-up "
                f"positions (step {first.start_step} of {first.warmup_steps}, step {position.start_step} of "
                f"{position.warmup_steps}): read and schedule each part of the model (e.g. critic and actor) "
                "on its own",
                param="model",
            )
    return first


def describe_peer(module: nn.Module) -> str:
    """Where a peer layer's warm-up stands, in a few words (:meth:`PeerSchedule.describe`)."""
    return _position(module).describe()


def peer_record(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, Any]:
    """The warm-up positions of `model`'s torchrl / sb3-contrib layers (read before converting them) as plain
    data for a converted checkpoint: ``{"positions": [{"layers": [names], **PeerSchedule.to_dict()}]}``, one
    entry per position (a CrossQ actor and critic may stand apart), or ``{}`` when there are none. `layers`:
    only these names (the ones being converted).

    Example::

        >>> import torch
        >>> from torchrl.modules import BatchRenorm1d
        >>> from brn_cli.nn.peers import peer_record
        >>> critic = torch.nn.Sequential(torch.nn.Linear(4, 8), BatchRenorm1d(8, warmup_steps=10))
        >>> for _ in range(3):
        ...     _ = critic(torch.randn(16, 4))
        >>> peer_record(critic)
        {'positions': [{'layers': ['1'], 'library': 'torchrl', 'start_step': 3, 'warmup_steps': 10, 'rmax': 3.0, 'dmax': 5.0, 'ramp': False}]}
    """
    wanted = None if layers is None else set(layers)
    groups: dict[PeerSchedule, list[str]] = {}
    for name, module in model.named_modules():
        if is_peer_renorm(module) and (wanted is None or name in wanted):
            groups.setdefault(_position(module), []).append(name)
    if not groups:
        return {}
    return {"positions": [{"layers": names, **position.to_dict()} for position, names in groups.items()]}


def _under(name: str, part: str) -> bool:
    return not part or name == part or name.startswith(part + ".")


def recorded_peer_schedule(record: Any, part: str | None = None) -> PeerSchedule:
    """The position :func:`peer_record` recorded, for the layers under `part` (a module name such as
    ``"critic"``; default: all). BrnError when there is none, the record is malformed, or the layers stand
    at different positions (then name the part)."""
    if not record:
        raise BrnError(
            "no torchrl / sb3-contrib warm-up position is recorded (it is written by converting such layers "
            "with brn convert)"
        )
    entries = record.get("positions") if isinstance(record, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("layers"), list) for e in entries
    ):
        raise BrnError("the recorded warm-up positions should be a list of {layers, position}")
    found = [(e["layers"], PeerSchedule.from_dict(e)) for e in entries]
    chosen = [(names, p) for names, p in found if any(_under(str(n), part or "") for n in names)]
    if not chosen:
        raise BrnError(f"no recorded warm-up position for layers under {part!r}", param="part")
    if len({p for _, p in chosen}) > 1:
        where = "; ".join(f"{', '.join(map(str, names))}: {p.describe()}" for names, p in chosen)
        raise BrnError(
            f"the recorded layers stand at different warm-up positions ({where}): name the `part` of the "
            "model (e.g. the critic) to continue",
            param="part",
        )
    return chosen[0][1]


def peer_skip_reason(module: nn.Module) -> str | None:
    """Why a peer layer cannot convert (a subclass that overrides forward), or None."""
    base = peer_renorm_class(module)
    if base is not None and type(module).forward is not base.forward:
        return f"{type(module).__qualname__} overrides forward(); converting would drop its behaviour"
    return None


def renorm_from_peer(
    module: nn.Module,
    target: type[BatchRenormNd] = BatchRenorm1d,
    *,
    momentum: float | None = None,
    rmax: float | None = None,
    dmax: float | None = None,
) -> BatchRenormNd:
    """A brn layer with a peer layer's parameters, statistics, eps and counter (copied, not recomputed).

    `momentum` defaults to the layer's own (all three libraries weigh the new batch by it). `rmax` / `dmax`
    default to the limits the layer's next training step would use once its warm-up is over, and stay
    unset (BatchNorm, with brn's warning if nothing opens them) while it is still warming up: drive them with
    a scheduler built from :func:`peer_schedule`.
    """
    mean, var = peer_statistics(module)
    position = _position(module)
    if rmax is None and dmax is None and position.limits_open:
        rmax, dmax = position.limits()
    affine = _affine(module)
    layer = target(
        int(module.num_features),
        eps=float(module.eps),
        momentum=float(module.momentum if momentum is None else momentum),
        rmax=rmax,
        dmax=dmax,
        affine=affine is not None,
        device=mean.device,
        dtype=mean.dtype,
    )
    with torch.no_grad():
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)  # sigma = sqrt(var + eps): their eval function exactly
        layer.num_batches_tracked.fill_(position.start_step)
        if affine is not None:
            layer.weight.copy_(affine[0])
            layer.bias.copy_(affine[1])
    if affine is not None:
        layer.weight.requires_grad_(affine[0].requires_grad)
        layer.bias.requires_grad_(affine[1].requires_grad)
    layer.train(module.training)
    return layer
