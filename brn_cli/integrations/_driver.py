"""What the Lightning and Hugging Face callbacks share, free of either framework.

A trainer owns the loop; brn only needs four moments of it: before the optimizer is built (convert the
BatchNorm layers, set up the statistics sync), when training starts (build the schedule, now that the total
number of steps is known), before each optimizer step (the limits of the trainer's global step) and when it
logs (the limits and the telemetry of the last step). :class:`RenormDriver` does each; the callbacks only call
it from the framework's hooks.

The schedule follows the trainer's global step (completed optimizer steps), which every trainer restores
on resume; the driver's own state (the schedules, whose ``paper-scaled`` knots depend on the run's length)
travels in the trainer's checkpoint through the callbacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any

from brn_cli.errors import BrnError

METRIC_PREFIX = "brn/"


def schedule_description(schedule: str | tuple[str, str], warmup_steps: int | None) -> str:
    """Validate the callback's schedule arguments early, in the user's process, with one clear line."""
    if warmup_steps is not None:
        if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise BrnError(
                f"`warmup_steps` must be a whole number >= 0, got {warmup_steps!r}", param="warmup_steps"
            )
        return f"warmup:{int(warmup_steps)}"
    if isinstance(schedule, str):
        return schedule
    if (
        isinstance(schedule, (tuple, list))
        and len(schedule) == 2
        and all(isinstance(s, str) for s in schedule)
    ):
        return f"{schedule[0]} / {schedule[1]}"
    raise BrnError(
        "`schedule` must be a preset name ('paper-scaled', 'paper', 'off') or a pair of "
        f"(rmax, dmax) specs such as ('5k:1,40k:3', '5k:0,25k:5'), got {schedule!r}",
        param="schedule",
    )


@dataclass(eq=False)
class RenormCallbackBase:
    """The constructor both trainer callbacks share, free of their frameworks: the options, checked at once
    in the user's process, and the :class:`RenormDriver` that carries them out.

    `schedule`: a preset (``paper-scaled`` stretches the paper's schedule to the run's length) or a pair of
    (rmax, dmax) specs; `warmup_steps`: instead, BatchNorm for that many steps, then `rmax`, `dmax` at once.
    `total_steps`: the run's length for a preset (default: the trainer's). `convert`: turn BatchNorm layers
    into Batch Renorm (``convert_options`` go to :func:`~brn_cli.nn.convert.convert_batchnorm`); a model
    converted already is accepted as it is. `stats_sync`: ``"global"`` or ``"local"`` renorm statistics
    when the trainer runs several processes. `log_telemetry`: report the limits and telemetry to the
    trainer's logs.

    A dataclass, so that each option is written once and both callbacks' signature is this one.
    """

    schedule: str | tuple[str, str] | list[str] = "paper-scaled"
    _: KW_ONLY
    warmup_steps: int | None = None
    rmax: float = 3.0
    dmax: float = 5.0
    total_steps: int | None = None
    convert: bool = True
    convert_options: Mapping[str, Any] | None = None
    stats_sync: str = "global"
    log_telemetry: bool = True

    def __post_init__(self) -> None:
        from brn_cli.train.distributed import parse_stats_sync

        schedule_description(self.schedule, self.warmup_steps)
        if isinstance(self.schedule, (tuple, list)):
            self.schedule = tuple(self.schedule)
        self.rmax, self.dmax = float(self.rmax), float(self.dmax)
        self.convert, self.log_telemetry = bool(self.convert), bool(self.log_telemetry)
        self.convert_options = dict(self.convert_options or {})
        self.stats_sync = parse_stats_sync(self.stats_sync)
        self.driver = RenormDriver(self)

    @property
    def scheduler(self) -> Any:
        """The :class:`~brn_cli.RenormScheduler` driving the limits (None before training starts)."""
        return self.driver.scheduler

    def arguments(self) -> dict[str, Any]:
        """The constructor's keyword arguments, JSON-typed: ``type(self)(**arguments())`` is an equal
        callback (what a trainer that rebuilds callbacks from its checkpoint calls)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.schedule, tuple):
            values["schedule"] = list(self.schedule)
        return values


class RenormDriver:
    """Converts a model, drives its renorm limits from a global step and reports them, as a callback's
    `options` say (see :class:`RenormCallbackBase`)."""

    def __init__(self, options: RenormCallbackBase) -> None:
        self.options = options
        self.scheduler: Any = None
        self.model: Any = None
        self._saved: dict[str, Any] | None = None  # scheduler state loaded before the scheduler exists
        self._limits_used = (1.0, 0.0)  # the limits of the step that ran last (what telemetry describes)
        self._dist: Any = None  # the DistContext of the statistics sync, while training

    def prepare(self, model: Any, *, optimizer_built: bool = False) -> int:
        """Convert `model`'s BatchNorm layers (or accept it converted); returns its renorm layer count.

        Conversion makes new Parameters, so it must come before the optimizer is built: with
        `optimizer_built`, a model that still has BatchNorm layers to convert is refused.
        """
        from brn_cli.nn.convert import convert_batchnorm, plan_conversion
        from brn_cli.nn.norms import renorm_layers

        if self.options.convert:
            plan = plan_conversion(model, **_plan_options(self.options.convert_options))
            pending = [d.name or "(model)" for d in plan if d.action == "convert"]
            if pending and optimizer_built:
                raise BrnError(
                    f"the model's BatchNorm layers ({', '.join(pending[:3])}) would be converted after the "
                    "optimizer was built, which would then train the old parameters; convert the model "
                    "before building the trainer (brn_cli.convert_batchnorm), or let the callback do it "
                    "by passing it when the trainer is built",
                    param="model",
                )
            convert_batchnorm(model, **self.options.convert_options)
        layers = renorm_layers(model)
        if not layers:
            what = "BatchNorm nor Batch Renorm layers" if self.options.convert else "Batch Renorm layers"
            raise BrnError(
                f"the model ({type(model).__name__}) has no {what} for the renorm callback to drive"
                + ("" if self.options.convert else "; convert it first or pass convert=True"),
                param="model",
            )
        self.model = model
        return len(layers)

    def sync_statistics(self, rank: int, world_size: int, device: str) -> str | None:
        """Set the renorm layers to brn's statistics sync over the default process group (several processes
        only); returns the note on plain BatchNorm layers left per rank, if any."""
        if world_size <= 1 or self.model is None:
            return None
        import torch.distributed as dist

        from brn_cli.train.distributed import DistContext, configure_stats_sync

        if not dist.is_initialized():
            raise BrnError(
                f"the trainer runs {world_size} processes but no torch.distributed process group exists "
                "for the renorm statistics sync"
            )
        self.release_statistics()  # a second run re-syncs the same layers
        ctx = DistContext(rank=rank, world_size=world_size, device=str(device), backend=dist.get_backend())
        note = configure_stats_sync(self.model, self.options.stats_sync, ctx).note()
        self._dist = ctx
        return note

    def release_statistics(self) -> None:
        """At the end of training: the layers let go of the trainer's process group (see
        :func:`~brn_cli.train.distributed.release_stats_sync`)."""
        if self._dist is not None:
            from brn_cli.train.distributed import release_stats_sync

            release_stats_sync(self._dist)
            self._dist = None

    def start(self, total_steps: int | None, global_step: int) -> None:
        """Build the scheduler (once) for a run of `total_steps` and move it to `global_step`."""
        if self.model is None:
            raise BrnError("the renorm callback started training before it saw the model", param="model")
        if self.scheduler is None or self.scheduler.model is not self.model:
            self.scheduler = self._build(self.options.total_steps or total_steps)
        if self._saved is not None:
            self.scheduler.load_state_dict(self._saved)  # the saved schedules win on resume
            self._saved = None
        self.scheduler.step = int(global_step)
        self._limits_used = self.scheduler.apply()

    def begin_step(self, global_step: int) -> None:
        """Before a training step: set the limits of `global_step` (completed optimizer steps) and remember
        them as the ones the telemetry of this step will describe."""
        self.follow(global_step)
        self._limits_used = self.scheduler.values()

    def follow(self, global_step: int) -> None:
        """Move the schedule to `global_step`, e.g. right after an optimizer step, so that a checkpoint saved
        then holds the new position."""
        scheduler = self.scheduler
        ahead = int(global_step) - scheduler.step
        if ahead > 0:
            scheduler.advance(ahead)  # also warns once if the limits opened on far-off statistics
        elif ahead < 0:
            scheduler.step = int(global_step)
            scheduler.apply()

    def metrics(self) -> dict[str, float]:
        """The limits the last step used and its telemetry, as ``brn/<name>`` floats for a logger."""
        from brn_cli.nn.norms import collect_telemetry

        rmax, dmax = self._limits_used
        values = {"rmax": rmax, "dmax": dmax, **collect_telemetry(self.model)}
        return {METRIC_PREFIX + name: float(value) for name, value in values.items()}

    def state_dict(self) -> dict[str, Any]:
        """Primitive-typed state for the trainer's checkpoint (JSON- and weights_only-safe)."""
        scheduler = self.scheduler.state_dict() if self.scheduler is not None else self._saved
        return {"scheduler": scheduler}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("scheduler") if isinstance(state, Mapping) else None
        if saved is None:
            return
        if self.scheduler is not None:
            self.scheduler.load_state_dict(dict(saved))
            self._limits_used = self.scheduler.values()
        else:
            self._saved = dict(saved)

    def _build(self, total_steps: int | None) -> Any:
        from brn_cli.train.schedule import RenormScheduler

        options = self.options
        if options.warmup_steps is not None:
            return RenormScheduler.warmup(
                self.model, warmup_steps=int(options.warmup_steps), rmax=options.rmax, dmax=options.dmax
            )
        if isinstance(options.schedule, str):
            return RenormScheduler.from_preset(self.model, options.schedule, total_steps=total_steps)
        rmax_spec, dmax_spec = options.schedule
        return RenormScheduler.from_specs(self.model, rmax_spec, dmax_spec, total_steps=total_steps)


def _plan_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of convert_batchnorm that plan_conversion also takes."""
    return {k: v for k, v in options.items() if k in ("include", "exclude", "frozen")}
