"""rmax / dmax schedules, driven by the optimizer step.

The paper (section 4) trains with rmax = 1, dmax = 0 (plain batchnorm) for 5k steps, then relaxes both
linearly: rmax reaches 3 at 40k steps, dmax reaches 5 at 25k. Relaxing slowly matters: early, with a large
learning rate, a sudden jump of rmax gave large gradients and loss spikes.

A schedule is a piecewise-linear function of the optimizer step through knots (s_0, v_0), ..., (s_n, v_n)
with s_0 < ... < s_n, held flat outside [s_0, s_n]::

    v(s) = v_0                                     for s <= s_0
    v(s) = v_i + (v_{i+1} - v_i) (s - s_i) / (s_{i+1} - s_i)    for s_i <= s <= s_{i+1}
    v(s) = v_n                                     for s >= s_n

Values at knots are returned exactly (no interpolation arithmetic), and each segment is clamped to its
endpoints so rounding can never overshoot a knot. A segment with an infinite endpoint (``inf`` = no
clipping) is infinite strictly between its knots.

Spec syntax (``rmax_schedule`` / ``dmax_schedule``):
  * ``5k:1,40k:3`` -- knots ``STEP:VALUE``; steps are integers with optional ``k`` (1e3) / ``M`` (1e6)
    suffix, strictly increasing; values are numbers or ``inf``;
  * ``3`` -- a constant;
  * presets ``paper``, ``paper-scaled`` (the paper's knots multiplied by total_steps / 130k, the length of
    the paper's run, so the warm-up and relaxation take the same fraction of a shorter run), ``off``
    (rmax 1, dmax 0: plain batchnorm training, the baseline).

:class:`RenormScheduler` advances with ``optimizer.step()`` (a step post-hook) and never with forward
calls, so gradient accumulation, microbatches and evaluation passes do not move it. Its position is kept in
the optimizer's first param group (``brn_renorm_step``), so a user's checkpoint of ``model.state_dict()`` and
``optimizer.state_dict()`` carries it without adding a key to the model's state_dict; brn's own runs also
save :meth:`~RenormScheduler.state_dict` (step and schedules). :meth:`RenormScheduler.warmup` is the hard
switch of CrossQ critics: BatchNorm for W steps, then rmax 3, dmax 5, and
:meth:`RenormScheduler.from_checkpoint` continues the torchrl / sb3-contrib warm-up that a converted
checkpoint records.
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from brn_cli.errors import BrnError
from brn_cli.nn.norms import set_renorm_limits

__all__ = [
    "PAPER_KNOTS",
    "POSITION_KEY",
    "PRESETS",
    "PeerWarmupNotContinued",
    "RenormOpeningWarning",
    "RenormScheduler",
    "Schedule",
    "format_schedule",
    "parse_schedule",
    "parse_step",
    "peer_warmup_note",
    "plot_schedules",
    "preset_schedules",
    "schedule_table",
]

KINDS = ("rmax", "dmax")
PRESETS = ("paper", "paper-scaled", "off")
# The paper's schedule (section 4): knots (step, value).
PAPER_KNOTS: dict[str, tuple[tuple[int, float], ...]] = {
    "rmax": ((5000, 1.0), (40000, 3.0)),
    "dmax": ((5000, 0.0), (25000, 5.0)),
}
PAPER_RUN_STEPS = 130_000  # the paper's run length: paper-scaled multiplies its knots by total/130k
_OFF_VALUE = {"rmax": 1.0, "dmax": 0.0}
_SUFFIX = {"": 1, "k": 1000, "K": 1000, "M": 1_000_000, "m": 1_000_000}
_STEP_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*$")


def parse_step(text: str) -> int:
    """'5000' / '5k' / '2.5k' / '1M' -> int. Raises BrnError on anything else or a fractional step."""
    m = _STEP_RE.match(text)
    if not m:
        raise BrnError(f"schedule step {text.strip()!r} is not a step count like 5000, 5k or 1M")
    value = float(m.group(1)) * _SUFFIX[m.group(2)]
    if not value.is_integer():
        raise BrnError(f"schedule step {text.strip()!r} is not a whole number of steps")
    return int(value)


def _parse_value(text: str, kind: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BrnError(f"{kind} schedule value {text.strip()!r} is not a number") from None
    _check_value(value, kind)
    return value


def _check_value(value: float, kind: str) -> None:
    if math.isnan(value):
        raise BrnError(f"{kind} schedule value is NaN")
    if kind == "rmax" and value < 1.0:
        raise BrnError(f"rmax must be >= 1 (r is clipped to [1/rmax, rmax]), got {value:g}")
    if kind == "dmax" and value < 0.0:
        raise BrnError(f"dmax must be >= 0 (d is clipped to [-dmax, dmax]), got {value:g}")


def _format_number(value: float) -> str:
    if math.isinf(value):
        return "inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)  # shortest text that reads back as the same float


def _format_step(step: int) -> str:
    if step and step % 1_000_000 == 0:
        return f"{step // 1_000_000}M"
    if step and step % 1000 == 0:
        return f"{step // 1000}k"
    return str(step)


@dataclass
class Schedule:
    """A piecewise-linear rmax or dmax schedule over optimizer steps (see the module docstring).

    knots: [(step, value), ...] with strictly increasing steps; one knot is a constant.
    kind: "rmax" or "dmax" (decides the validity check: rmax >= 1, dmax >= 0).
    spec: the text it was parsed from (a preset name, or the knots), for display.
    """

    knots: list[tuple[int, float]]
    kind: str = "rmax"
    spec: str = ""

    def __post_init__(self) -> None:
        self.knots = [(int(s), float(v)) for s, v in self.knots]
        if self.kind not in KINDS:
            raise BrnError(f"schedule kind must be rmax or dmax, got {self.kind!r}")
        if not self.knots:
            raise BrnError(f"empty {self.kind} schedule")
        for (s0, _), (s1, _) in zip(self.knots, self.knots[1:], strict=False):
            if s1 <= s0:
                raise BrnError(
                    f"{self.kind} schedule steps must increase: {_format_step(s1)} comes after "
                    f"{_format_step(s0)}"
                )
        for step, value in self.knots:
            if step < 0:
                raise BrnError(f"{self.kind} schedule step {step} is negative")
            _check_value(value, self.kind)

    def __call__(self, step: int | float) -> float:
        """The value at optimizer step `step` (exact at knots, linear between, flat outside)."""
        knots = self.knots
        if step <= knots[0][0]:
            return knots[0][1]
        if step >= knots[-1][0]:
            return knots[-1][1]
        # Few knots: a linear scan is clearer than bisect and just as fast.
        for (s0, v0), (s1, v1) in zip(knots, knots[1:], strict=False):
            if step == s1:
                return v1
            if s0 <= step < s1:
                if step == s0:
                    return v0
                if math.isinf(v0) or math.isinf(v1):
                    return math.inf
                t = (step - s0) / (s1 - s0)
                value = v0 + (v1 - v0) * t
                return min(max(value, min(v0, v1)), max(v0, v1))  # no overshoot past a knot
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def is_constant(self) -> bool:
        return all(v == self.knots[0][1] for _, v in self.knots)

    def key_steps(self, total_steps: int | None = None) -> list[int]:
        """Steps worth showing in a preview: 0, every knot, segment midpoints, and the last step."""
        steps = {0}
        for (s0, _), (s1, _) in zip(self.knots, self.knots[1:], strict=False):
            steps.add((s0 + s1) // 2)
        steps.update(s for s, _ in self.knots)
        if total_steps is not None:
            steps = {s for s in steps if s <= total_steps}
            steps.add(total_steps)
        return sorted(steps)

    def to_dict(self) -> dict[str, Any]:
        """Primitive-typed form for checkpoints (loads with weights_only=True)."""
        return {"kind": self.kind, "spec": self.spec, "knots": [[int(s), float(v)] for s, v in self.knots]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        try:
            knots = [(int(s), float(v)) for s, v in data["knots"]]
            return cls(knots=knots, kind=str(data.get("kind", "rmax")), spec=str(data.get("spec", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise BrnError(f"saved schedule is malformed ({exc})") from None


def format_schedule(schedule: Schedule) -> str:
    """Knot text that :func:`parse_schedule` reads back to the same schedule ('5k:1,40k:3')."""
    return ",".join(f"{_format_step(s)}:{_format_number(v)}" for s, v in schedule.knots)


def _scaled_knots(kind: str, total_steps: int) -> list[tuple[int, float]]:
    """The paper's knots multiplied by total_steps / 130k, rounded, kept strictly increasing."""
    knots: list[tuple[int, float]] = []
    for step, value in PAPER_KNOTS[kind]:
        s = round(step * total_steps / PAPER_RUN_STEPS)
        if knots and s <= knots[-1][0]:
            s = knots[-1][0] + 1
        knots.append((s, value))
    return knots


def parse_schedule(spec: str, *, kind: str, total_steps: int | None = None) -> Schedule:
    """Parse a schedule spec (knots, constant or preset; see the module docstring).

    `total_steps` is needed by ``paper-scaled`` only. Raises BrnError with one clear line on bad input.
    """
    if kind not in KINDS:
        raise BrnError(f"schedule kind must be rmax or dmax, got {kind!r}")
    text = spec.strip()
    if not text:
        raise BrnError(f"empty {kind} schedule")
    name = text.lower()
    if name == "paper":
        return Schedule(list(PAPER_KNOTS[kind]), kind, "paper")
    if name == "paper-scaled":
        if total_steps is None or total_steps < 1:
            raise BrnError("the paper-scaled schedule needs the run's total number of steps (>= 1)")
        return Schedule(_scaled_knots(kind, int(total_steps)), kind, "paper-scaled")
    if name == "off":
        return Schedule([(0, _OFF_VALUE[kind])], kind, "off")
    if ":" not in text:
        if "," in text or not re.match(r"^[+-]?(inf|[0-9.eE+-]+)$", name):
            raise BrnError(
                f"unknown {kind} schedule {spec!r}: expected STEP:VALUE,STEP:VALUE (e.g. 5k:1,40k:3), "
                f"a number, or one of {', '.join(PRESETS)}"
            )
        return Schedule([(0, _parse_value(text, kind))], kind, text)
    knots = []
    for part in text.split(","):
        if part.count(":") != 1:
            raise BrnError(f"{kind} schedule item {part.strip()!r} is not STEP:VALUE (e.g. 5k:1,40k:3)")
        step_text, value_text = part.split(":")
        knots.append((parse_step(step_text), _parse_value(value_text, kind)))
    return Schedule(knots, kind, text)


def preset_schedules(
    name: str, *, total_steps: int | None = None
) -> tuple[Schedule, Schedule]:  # (rmax, dmax)
    """Both schedules of a preset (``paper``, ``paper-scaled``, ``off``)."""
    if name.strip().lower() not in PRESETS:
        raise BrnError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return (
        parse_schedule(name, kind="rmax", total_steps=total_steps),
        parse_schedule(name, kind="dmax", total_steps=total_steps),
    )


class RenormOpeningWarning(UserWarning):
    """The clipping limits opened while a layer's moving averages were far from its batch statistics."""


class PeerWarmupNotContinued(UserWarning):
    """A run starts its own schedule on a checkpoint that records a torchrl / sb3-contrib warm-up position."""


def peer_warmup_note(record: dict[str, Any], rmax_spec: str, dmax_spec: str, *, source: str) -> str | None:
    """What a run with schedules `rmax_spec` / `dmax_spec` counted from step 0 should say about the peer
    warm-up position `record` (``LoadedCheckpoint.peer_schedule``) of checkpoint `source`: that it does not
    continue it, and the specs that would; None when there is nothing to say (no record, or the specs given
    are those)."""
    from brn_cli.nn.peers import recorded_peer_schedule

    if not record:
        return None
    try:
        position = recorded_peer_schedule(record)
    except BrnError:  # layers standing apart: one schedule cannot continue them all
        where = "; ".join(
            f"layers {', '.join(map(str, e['layers']))}: step {e['start_step']} of {e['warmup_steps']}"
            for e in record["positions"]
        )
        return (
            f"{source} records torchrl / sb3-contrib warm-up positions that differ ({where}); this run drives "
            f"every renorm layer with one schedule from step 0 (`rmax_schedule={rmax_spec}`), not theirs"
        )
    rmax_next, dmax_next = position.remaining_specs()
    if (rmax_spec.strip(), dmax_spec.strip()) == (rmax_next, dmax_next):
        return None
    return (
        f"{source} records a {position.library or 'peer'} warm-up position ({position.describe()}); this run "
        f"follows its own schedule from step 0 (`rmax_schedule={rmax_spec}`) and does not continue it; "
        f"to continue it, `rmax_schedule={rmax_next}` `dmax_schedule={dmax_next}`"
    )


# Where the schedule position travels: a key of the optimizer's first param group, which
# ``optimizer.state_dict()`` / ``load_state_dict()`` carry (as torch's LR schedulers' ``initial_lr``). The
# model's state_dict gets no new key, so a renorm state_dict still loads strictly into nn.BatchNorm.
POSITION_KEY = "brn_renorm_step"
# The first step run with open limits is checked against these (per layer, from its telemetry): beyond
# them the renorm correction r, d is large and the paper's warning applies (loss spikes, divergence).
OPENING_LOG_R_LIMIT = 0.5  # batch sigma about 1.65x off the moving sigma, on average over channels
OPENING_D_LIMIT = 1.0  # batch mean one moving sigma off the moving mean, on average over channels


def _switch(kind: str, warmup_steps: int, value: float) -> Schedule:
    """``off`` for steps 0..warmup_steps-1, then `value` (a hard switch)."""
    if warmup_steps == 0:
        return Schedule([(0, value)], kind, _format_number(float(value)))
    spec = (
        f"{warmup_steps - 1}:{_format_number(_OFF_VALUE[kind])},{warmup_steps}:{_format_number(float(value))}"
    )
    return Schedule([(warmup_steps - 1, _OFF_VALUE[kind]), (warmup_steps, value)], kind, spec)


class RenormScheduler:
    """Drives rmax/dmax of every renorm layer of a model from the optimizer step.

    ``step`` counts completed optimizer steps; the limits used during step s are ``rmax(s)``, ``dmax(s)``.
    :meth:`attach` registers an optimizer step post-hook, so ``optimizer.step()`` (and only that) advances
    the schedule: forward calls, eval passes, gradient accumulation and microbatches leave it unchanged,
    and a step skipped by an AMP GradScaler (inf/NaN gradients) does not count. Under DDP every rank steps
    its optimizer in lockstep, so every rank follows the same global step.

    The position also lives in the attached optimizer (``param_groups[0]["brn_renorm_step"]``), so a
    checkpoint of ``model.state_dict()`` and ``optimizer.state_dict()`` carries it: loading that optimizer
    state into the attached optimizer moves the scheduler to the saved step. An optimizer state without a
    position (saved with no scheduler attached) gets a :class:`UserWarning` at the next step, unless
    :meth:`load_state_dict` or ``start_step`` set the position meanwhile.

    The first step run with open limits (rmax > 1 or dmax > 0) is checked once: if some layer's batch
    statistics were far from its moving averages (mean |log r| > 0.5 or mean |d| > 1), a
    :class:`RenormOpeningWarning` names it (run BatchNorm steps first, or calibrate).

    Example::

        >>> import torch
        >>> from brn_cli import BatchRenorm1d, RenormScheduler
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), BatchRenorm1d(8))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sched = RenormScheduler.from_preset(model, "paper-scaled", total_steps=1000, optimizer=opt)
        >>> sched.step, sched.values()
        (0, (1.0, 0.0))
        >>> sched.values(1000)
        (3.0, 5.0)
    """

    def __init__(
        self,
        model: Any,
        rmax: Schedule,
        dmax: Schedule,
        optimizer: Any = None,
        start_step: int | None = None,
    ) -> None:
        from brn_cli.nn.norms import renorm_layers

        if rmax.kind != "rmax" or dmax.kind != "dmax":
            raise BrnError("RenormScheduler needs an rmax schedule and a dmax schedule")
        if not renorm_layers(model):
            raise BrnError(
                f"the model ({type(model).__name__}) has no Batch Renorm layers for the scheduler to drive; "
                "convert it first: brn_cli.convert_batchnorm(model)",
                param="model",
            )
        self.model = model
        self.rmax = rmax
        self.dmax = dmax
        self.step = 0 if start_step is None else int(start_step)
        self._start_given = start_step is not None
        self._optimizer: Any = None
        self._handles: list[Any] = []
        self._position_lost = False  # an optimizer state without a position was loaded
        self._opening_checked = False
        self.apply()
        if optimizer is not None:
            self.attach(optimizer)

    def values(self, step: int | None = None) -> tuple[float, float]:
        """(rmax, dmax) at `step` (default: the current step)."""
        s = self.step if step is None else step
        return self.rmax(s), self.dmax(s)

    def apply(self) -> tuple[float, float]:
        """Write the current step's limits into every renorm layer; returns them."""
        r, d = self.values()
        set_renorm_limits(self.model, r, d)
        self._write_position()
        return r, d

    def advance(self, n: int = 1) -> None:
        """Count `n` completed optimizer steps and update the layers."""
        if self._position_lost:
            self._position_lost = False
            warnings.warn(
                "the optimizer state loaded into this RenormScheduler's optimizer carried no schedule "
                f"position (saved without a scheduler attached?): the schedule goes on from step {self.step}, "
                "not from the saved run's step; pass start_step= when rebuilding the scheduler",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )
        if not self._opening_checked and self.values() != (1.0, 0.0):
            self._opening_checked = True
            self._check_opening()
        self.step += int(n)
        self.apply()

    def attach(self, optimizer: Any) -> None:
        """Advance after every ``optimizer.step()``; keep the position in the optimizer's state.

        A position already in `optimizer` (its state was loaded from a checkpoint) is taken unless
        ``start_step`` was given.
        """
        self.detach()
        self._optimizer = optimizer
        carried = _carried_step(optimizer)
        if carried is not None and not self._start_given:
            self.step = carried
        # An optimizer that has stepped (it holds per-parameter state) but carries no position was loaded
        # from a checkpoint saved without a scheduler: the step it stopped at is unknown.
        self._position_lost = (
            carried is None and not self._start_given and bool(getattr(optimizer, "state", None))
        )
        self.apply()
        self._handles = [optimizer.register_step_post_hook(lambda *_args, **_kw: self.advance())]
        # Optimizer wrappers may lack the load hook; the position is then read back only at attach.
        register_load_hook = getattr(optimizer, "register_load_state_dict_post_hook", None)
        if register_load_hook is not None:
            self._handles.append(register_load_hook(lambda *_args, **_kw: self._optimizer_loaded()))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._optimizer = None

    def state_dict(self) -> dict[str, Any]:
        """Primitive-typed state for the run's checkpoint: step and both schedules."""
        return {"step": self.step, "rmax": self.rmax.to_dict(), "dmax": self.dmax.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore step and schedules saved by :meth:`state_dict` (the saved schedules win on resume)."""
        try:
            self.rmax = Schedule.from_dict(state["rmax"])
            self.dmax = Schedule.from_dict(state["dmax"])
            self.step = int(state["step"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BrnError(f"saved schedule state is malformed ({exc})") from None
        self._position_lost = False
        self.apply()

    def _write_position(self) -> None:
        if self._optimizer is not None and self._optimizer.param_groups:
            self._optimizer.param_groups[0][POSITION_KEY] = self.step

    def _optimizer_loaded(self) -> None:
        """The attached optimizer's state was replaced: follow the position it carries."""
        carried = _carried_step(self._optimizer)
        if carried is None:
            self._position_lost = True  # said at the next step, unless load_state_dict sets it first
        else:
            self.step = carried
            self._position_lost = False
        self.apply()

    def _check_opening(self) -> None:
        """Warn once if the first step with open limits found a layer's statistics far from its averages."""
        worst = _far_layer(self.model)
        if worst is None:
            return
        name, log_r, d = worst
        r, dm = self.values()
        warnings.warn(
            f"renorm limits opened (rmax {r:g}, dmax {dm:g}) while layer {name or '(model)'}'s moving "
            f"averages are far from its batch statistics (mean |log r| {log_r:.2f}, mean |d| {d:.2f}): "
            "expect loss spikes; train some steps as BatchNorm first (RenormScheduler.warmup) or "
            "calibrate the statistics (brn_cli.calibrate)",
            RenormOpeningWarning,
            stacklevel=_user_stacklevel(),
        )

    @classmethod
    def from_specs(
        cls,
        model: Any,
        rmax_spec: str,
        dmax_spec: str,
        *,
        total_steps: int | None = None,
        start_step: int | None = None,
        optimizer: Any = None,
    ) -> RenormScheduler:
        """Build from the ``rmax_schedule`` / ``dmax_schedule`` texts (``"5k:1,40k:3"``, ``"3"``, a preset).

        Example::

            >>> import torch
            >>> from brn_cli import BatchRenorm1d, RenormScheduler
            >>> model = torch.nn.Sequential(BatchRenorm1d(4))
            >>> RenormScheduler.from_specs(model, "10:1,20:3", "10:0,30:5").values(20)
            (3.0, 2.5)
        """
        return cls(
            model,
            parse_schedule(rmax_spec, kind="rmax", total_steps=total_steps),
            parse_schedule(dmax_spec, kind="dmax", total_steps=total_steps),
            optimizer=optimizer,
            start_step=start_step,
        )

    @classmethod
    def from_preset(
        cls,
        model: Any,
        preset: str = "paper-scaled",
        *,
        total_steps: int | None = None,
        optimizer: Any = None,
        start_step: int | None = None,
    ) -> RenormScheduler:
        """Both limits from a preset: ``paper`` (the paper's steps), ``paper-scaled`` (the paper's schedule
        stretched to `total_steps`), ``off`` (BatchNorm throughout).

        Example::

            >>> import torch
            >>> from brn_cli import BatchRenorm1d, RenormScheduler
            >>> model = torch.nn.Sequential(BatchRenorm1d(4))
            >>> RenormScheduler.from_preset(model, "paper").values(40_000)
            (3.0, 5.0)
        """
        rmax, dmax = preset_schedules(preset, total_steps=total_steps)
        return cls(model, rmax, dmax, optimizer=optimizer, start_step=start_step)

    @classmethod
    def warmup(
        cls,
        model: Any,
        optimizer: Any = None,
        *,
        warmup_steps: int,
        rmax: float = 3.0,
        dmax: float = 5.0,
        start_step: int | None = None,
    ) -> RenormScheduler:
        """BatchNorm (rmax 1, dmax 0) for the first `warmup_steps` optimizer steps, then `rmax`, `dmax` at
        once: the hard switch CrossQ's critics use (torchrl, sb3-contrib), rmax 3 / dmax 5 by default.
        The warm-up lets the moving averages settle before they enter the normalization.

        Example::

            >>> import torch
            >>> from brn_cli import BatchRenorm1d, RenormScheduler
            >>> critic = torch.nn.Sequential(torch.nn.Linear(4, 8), BatchRenorm1d(8), torch.nn.ReLU())
            >>> opt = torch.optim.Adam(critic.parameters())
            >>> sched = RenormScheduler.warmup(critic, opt, warmup_steps=100)
            >>> sched.values(99), sched.values(100)
            ((1.0, 0.0), (3.0, 5.0))
        """
        steps = int(warmup_steps)
        if steps < 0 or steps != warmup_steps:
            raise BrnError(
                f"`warmup_steps` must be a whole number >= 0, got {warmup_steps}", param="warmup_steps"
            )
        return cls(
            model,
            _switch("rmax", steps, rmax),
            _switch("dmax", steps, dmax),
            optimizer=optimizer,
            start_step=start_step,
        )

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Any,
        model: Any = None,
        optimizer: Any = None,
        *,
        part: str | None = None,
    ) -> RenormScheduler:
        """Continue the torchrl / sb3-contrib warm-up that a converted checkpoint records (``brn convert``
        keeps each converted layer's position): the limits open at the step where the library's own layer
        would have opened them, counted in `optimizer`'s steps from there.

        `checkpoint`: a :class:`~brn_cli.storage.checkpoint.LoadedCheckpoint` or a path (loaded with its
        recorded architecture). `model`: the converted model to drive (default: the checkpoint's, or its
        `part`). `part`: the module whose layers to continue (``"critic"``), needed when the recorded layers
        stand at different positions (a CrossQ actor and critic). BrnError when nothing is recorded.

        On the checkpoint ``brn convert`` wrote from a torchrl / sb3-contrib critic, in the training loop::

            ckpt = brn_cli.load_checkpoint("critic_brn.pt", arch="mypkg.nets:critic")
            optimizer = torch.optim.Adam(ckpt.model.parameters(), lr=3e-4)
            scheduler = brn_cli.RenormScheduler.from_checkpoint(ckpt, optimizer=optimizer)

        Example (the record made by hand, as convert makes it)::

            >>> from pathlib import Path
            >>> import torch
            >>> from torchrl.modules import BatchRenorm1d as TorchrlRenorm
            >>> from brn_cli import BatchRenorm1d, RenormScheduler
            >>> from brn_cli.nn.peers import peer_record
            >>> from brn_cli.storage.checkpoint import LoadedCheckpoint
            >>> critic = torch.nn.Sequential(torch.nn.Linear(4, 8), TorchrlRenorm(8, warmup_steps=10))
            >>> for _ in range(4):
            ...     _ = critic(torch.randn(16, 4))
            >>> record = peer_record(critic)  # step 4 of 10
            >>> critic[1] = BatchRenorm1d(8)
            >>> ckpt = LoadedCheckpoint(critic, Path("critic_brn.pt"), "brn", [], peer_schedule=record)
            >>> opt = torch.optim.Adam(critic.parameters())
            >>> sched = RenormScheduler.from_checkpoint(ckpt, optimizer=opt)
            >>> sched.step, sched.values(9), sched.values(10)
            (4, (1.0, 0.0), (3.0, 5.0))
        """
        return _from_checkpoint(cls, checkpoint, model, optimizer, part)


def _from_checkpoint(
    cls: type[RenormScheduler], checkpoint: Any, model: Any, optimizer: Any, part: str | None
) -> RenormScheduler:
    from brn_cli.nn.peers import recorded_peer_schedule
    from brn_cli.storage.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    try:
        position = recorded_peer_schedule(ckpt.peer_schedule, part)
    except BrnError as exc:
        raise BrnError(f"{ckpt.path}: {exc}", param=exc.param) from None
    if model is None:
        model = ckpt.model.get_submodule(part) if part else ckpt.model
    return cls.from_specs(model, optimizer=optimizer, **position.scheduler_kwargs())


def _user_stacklevel() -> int:
    """`stacklevel` for a warning raised below here that points at the user's code: the first frame outside
    brn and torch (the scheduler runs from an optimizer hook, so a fixed level would name torch or brn)."""
    frame, level = sys._getframe(1), 1  # level 1: the function that calls warnings.warn
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("brn_cli", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def _carried_step(optimizer: Any) -> int | None:
    """The schedule position an optimizer's state carries, or None."""
    groups = getattr(optimizer, "param_groups", None) or []
    value = groups[0].get(POSITION_KEY) if groups else None
    if value is None:
        return None
    try:
        step = int(value)
    except (TypeError, ValueError):
        raise BrnError(f"the optimizer state's {POSITION_KEY} is {value!r}, not a step count") from None
    if step < 0:
        raise BrnError(f"the optimizer state's {POSITION_KEY} is {step}, a negative step")
    return step


def _far_layer(model: Any) -> tuple[str, float, float] | None:
    """(name, mean |log r|, mean |d|) of the renorm layer whose last training step was farthest past the
    opening limits, or None when none is past them (or none has run). One host sync."""
    import torch

    from brn_cli.nn.norms import renorm_layers

    layers = renorm_layers(model)
    tensors = [m.telemetry for _, m in layers]
    if len({t.device for t in tensors}) > 1:
        tensors = [t.cpu() for t in tensors]
    rows = torch.stack(tensors).cpu()  # per layer: r clip, d clip, mean |log r|, mean |d|
    excess = torch.maximum(rows[:, 2] / OPENING_LOG_R_LIMIT, rows[:, 3] / OPENING_D_LIMIT)
    excess = torch.nan_to_num(excess, nan=0.0)
    index = int(excess.argmax())
    if float(excess[index]) <= 1.0:
        return None
    return layers[index][0], float(rows[index, 2]), float(rows[index, 3])


def schedule_table(schedules: Sequence[Schedule], total_steps: int) -> list[dict[str, Any]]:
    """Rows {step, <kind>: value, ...} at the union of the schedules' key steps up to total_steps."""
    steps = sorted({s for sch in schedules for s in sch.key_steps(total_steps)})
    return [{"step": s, **{sch.kind: sch(s) for sch in schedules}} for s in steps]


def plot_schedules(
    schedules: Sequence[Schedule], total_steps: int, path: Any, *, force: bool = False
) -> None:
    """Write a PNG of the schedules over [0, total_steps] atomically (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brn_cli.storage.atomic import atomic_path

    n = 512
    xs = sorted(
        {round(i * total_steps / n) for i in range(n + 1)} | {s for sch in schedules for s, _ in sch.knots}
    )
    xs = [x for x in xs if 0 <= x <= total_steps]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    try:
        for sch in schedules:
            ys = [sch(x) for x in xs]
            ax.plot(xs, ys, label=f"{sch.kind} ({sch.spec or format_schedule(sch)})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("limit")
        ax.set_title("Batch Renorm clipping limits")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(path, force=force) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
