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

Spec syntax (``--rmax-schedule`` / ``--dmax-schedule``):
  * ``5k:1,40k:3`` -- knots ``STEP:VALUE``; steps are integers with optional ``k`` (1e3) / ``M`` (1e6)
    suffix, strictly increasing; values are numbers or ``inf``;
  * ``3`` -- a constant;
  * presets ``paper``, ``paper-scaled`` (the paper's knots multiplied by total_steps / 130k, the length of
    the paper's run, so the warm-up and relaxation take the same fraction of a shorter run), ``off``
    (rmax 1, dmax 0: plain batchnorm training, the baseline).

:class:`RenormScheduler` advances with ``optimizer.step()`` (a step post-hook) and never with forward
calls, so gradient accumulation, microbatches and evaluation passes do not move it; its
:meth:`~RenormScheduler.state_dict` goes into the run's checkpoint and restores it on resume.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from brn_cli.errors import BrnError
from brn_cli.nn.norms import set_renorm_limits

__all__ = [
    "PAPER_KNOTS",
    "PRESETS",
    "RenormScheduler",
    "Schedule",
    "format_schedule",
    "parse_schedule",
    "parse_step",
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


class RenormScheduler:
    """Drives rmax/dmax of every renorm layer of a model from the optimizer step.

    ``step`` counts completed optimizer steps; the limits used during step s are ``rmax(s)``, ``dmax(s)``.
    :meth:`attach` registers an optimizer step post-hook, so ``optimizer.step()`` (and only that) advances
    the schedule: forward calls, eval passes, gradient accumulation and microbatches leave it unchanged,
    and a step skipped by an AMP GradScaler (inf/NaN gradients) does not count. Under DDP every rank steps
    its optimizer in lockstep, so every rank follows the same global step.
    """

    def __init__(
        self, model: Any, rmax: Schedule, dmax: Schedule, optimizer: Any = None, start_step: int = 0
    ) -> None:
        if rmax.kind != "rmax" or dmax.kind != "dmax":
            raise BrnError("RenormScheduler needs an rmax schedule and a dmax schedule")
        self.model = model
        self.rmax = rmax
        self.dmax = dmax
        self.step = int(start_step)
        self._handle = None
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
        return r, d

    def advance(self, n: int = 1) -> None:
        """Count `n` completed optimizer steps and update the layers."""
        self.step += int(n)
        self.apply()

    def attach(self, optimizer: Any) -> None:
        """Advance after every ``optimizer.step()``."""
        self.detach()
        self._handle = optimizer.register_step_post_hook(lambda *_args, **_kw: self.advance())

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

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
        self.apply()

    @classmethod
    def from_specs(
        cls,
        model: Any,
        rmax_spec: str,
        dmax_spec: str,
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        optimizer: Any = None,
    ) -> RenormScheduler:
        """Build from the --rmax-schedule / --dmax-schedule texts."""
        return cls(
            model,
            parse_schedule(rmax_spec, kind="rmax", total_steps=total_steps),
            parse_schedule(dmax_spec, kind="dmax", total_steps=total_steps),
            optimizer=optimizer,
            start_step=start_step,
        )


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
