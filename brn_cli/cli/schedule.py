"""`brn schedule`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from brn_cli.cli.app import app, out
from brn_cli.cli.options import ForceOpt, JsonOpt, print_json
from brn_cli.errors import BrnError


@app.command("schedule")
def schedule_cmd(
    spec: Annotated[
        str,
        typer.Argument(help="STEP:VALUE,... (steps may use k/M), a constant, or paper | paper-scaled | off."),
    ],
    steps: Annotated[int, typer.Option("--steps", help="Run length in optimizer steps.")],
    kind: Annotated[str, typer.Option("--kind", help="rmax or dmax, for a custom spec.")] = "rmax",
    plot: Annotated[Path | None, typer.Option("--plot", help="Also write the curves as a PNG.")] = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Preview an rmax/dmax schedule: values at key steps, optionally a PNG plot."""
    from brn_cli.storage.atomic import check_writable
    from brn_cli.train.schedule import (
        PRESETS,
        parse_schedule,
        plot_schedules,
        preset_schedules,
        schedule_table,
    )

    if steps < 1:
        raise BrnError(f"--steps must be >= 1, got {steps}")
    if kind not in ("rmax", "dmax"):
        raise BrnError(f"--kind must be rmax or dmax, got {kind!r}")
    if plot is not None:
        check_writable(plot, force=force)
    if spec.strip().lower() in PRESETS:
        schedules = list(preset_schedules(spec, total_steps=steps))
    else:
        schedules = [parse_schedule(spec, kind=kind, total_steps=steps)]
    rows = schedule_table(schedules, steps)
    if plot is not None:
        plot_schedules(schedules, steps, plot, force=force)
    if as_json:
        print_json(
            {
                "spec": spec,
                "steps": steps,
                "schedules": [s.to_dict() for s in schedules],
                "table": rows,
                "plot": str(plot) if plot else None,
            }
        )
        return
    table = Table()
    table.add_column("step", justify="right")
    for s in schedules:
        table.add_column(s.kind, justify="right")
    for row in rows:
        table.add_row(f"{row['step']:,}", *(f"{row[s.kind]:.4g}" for s in schedules))
    out.print(table)
    for s in schedules:
        knots = ", ".join(f"{k:,}:{v:g}" for k, v in s.knots)
        out.print(f"{s.kind}: {s.spec or 'custom'} -> knots {knots}")
    if plot is not None:
        out.print(f"wrote {plot}")
