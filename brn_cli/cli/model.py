"""`brn inspect` and `brn convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from brn_cli.cli.app import app, out, with_flags
from brn_cli.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    CheckpointArg,
    ForceOpt,
    InputShapeOpt,
    JsonOpt,
    KeyOpt,
    TrustPickleOpt,
    load,
    parse_shape,
    print_json,
    print_wrote_checkpoint,
)
from brn_cli.errors import BrnError


def file_text(text: object, limit: int = 200) -> str:
    """A string read from a checkpoint, made safe to print: control characters escaped, cut at `limit`.
    Print it in a rich Text, never as markup."""
    from brn_cli.storage.checkpoint import printable

    return printable(text, limit)


@app.command("inspect")
def inspect_cmd(
    checkpoint: CheckpointArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None,
    input_shape: InputShapeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the normalization layers of a checkpoint: type, channels, eps, momentum, fold target, health."""
    from brn_cli.deploy.inspection import inspect_model

    ckpt = load(checkpoint, arch, arch_kwargs, trust_pickle, key)
    report = inspect_model(ckpt, parse_shape(input_shape))
    if as_json:
        print_json(report.to_dict())
        return
    # Names come from the file: shown as plain text (Text objects take no markup or emoji codes) with
    # control characters escaped.
    out.print(
        Text.assemble(
            (file_text(report.path), "bold"),
            f"  format: {report.file_format}",
            f"  arch: {file_text(report.arch)}" if report.arch else "",
        )
    )
    if report.top_level_keys:
        out.print(Text("top-level keys: " + ", ".join(file_text(k, 60) for k in report.top_level_keys[:12])))
    out.print(f"parameters: {report.parameters:,}   sample input: {report.input_shape or 'unknown'}")
    if report.trace_error:
        out.print(Text(f"graph: {file_text(report.trace_error)}", style="yellow"))
    for entry in report.peer_warmup:  # recorded by brn convert; names come from the file
        layers = ", ".join(file_text(name, 60) for name in entry["layers"][:8])
        more = f" and {len(entry['layers']) - 8} more" if len(entry["layers"]) > 8 else ""
        out.print(
            Text(
                f"{file_text(entry['library'], 20)} warm-up when converted (layers {layers}{more}): "
                f"{entry['description']}; RenormScheduler.from_checkpoint continues it"
            )
        )
    if not report.norms:
        out.print("no normalization layers")
        return
    _print_norm_table(report.norms)
    foldable = sum(1 for n in report.norms if n.fold_into)
    unhealthy = sum(1 for n in report.norms if n.health not in ("ok", "no running stats"))
    out.print(
        f"{len(report.norms)} normalization layers, {foldable} foldable, "
        f"{unhealthy} with unhealthy running statistics"
    )
    frozen = sum(1 for n in report.norms if n.frozen)
    if frozen:
        out.print(
            f"{frozen} frozen norms: brn convert keeps them frozen unless given --frozen convert or convert-all"
        )


def _print_norm_table(norms) -> None:
    """One row per normalization layer; names, types and reasons come from the file: plain text."""
    table = Table(show_lines=False)
    for col in (
        "layer",
        "type",
        "C",
        "eps",
        "momentum",
        "fold into / why not",
        "running stats",
        "brn convert",
    ):
        table.add_column(col)
    for n in norms:
        if n.fold_into:
            fold = Text(file_text(n.fold_into), style="green")
        else:
            fold = Text(file_text(n.fold_reason or ""), style="dim")
        healthy = n.health in ("ok", "no running stats")
        mom = "-" if n.momentum is None else f"{n.momentum:g}"
        table.add_row(
            Text(file_text(n.name)),
            Text(file_text(n.type)),
            str(n.channels or "-"),
            f"{n.eps:g}" if n.eps is not None else "-",
            mom,
            fold,
            Text(file_text(n.health), style="" if healthy else "red"),
            Text(with_flags(file_text(n.on_convert or "-", 400), ["convert"])),
        )
    out.print(table)


@app.command("convert")
def convert_cmd(
    checkpoint: CheckpointArg,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output brn checkpoint.")] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Only convert layers whose name matches this glob (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Skip layers whose name matches this glob (repeatable)."),
    ] = None,
    momentum: Annotated[
        float, typer.Option("--momentum", help="Moving-average rate of mu and sigma (the paper's alpha).")
    ] = 0.01,
    frozen: Annotated[
        str,
        typer.Option(
            "--frozen",
            help="Frozen BatchNorms (FrozenBatchNorm2d, as in torchvision detectors): keep (leave them frozen), "
            "convert (trainable renorm, except in stages whose convolutions are frozen), or convert-all.",
        ),
    ] = "keep",
    input_shape: InputShapeOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would convert; write nothing.")
    ] = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Replace BatchNorm layers by Batch Renorm (eval outputs unchanged) and write a brn checkpoint."""
    from brn_cli.errors import VerificationError
    from brn_cli.nn.convert import convert_checked, plan_checked
    from brn_cli.nn.peers import peer_record
    from brn_cli.storage.atomic import check_writable

    if not 0.0 < momentum <= 1.0:
        raise BrnError(f"--momentum must be in (0, 1], got {momentum}")
    if output is None and not dry_run:
        raise BrnError("missing -o/--output (or pass --dry-run)")
    if output is not None and not dry_run:
        check_writable(output, force=force)
    shape = parse_shape(input_shape)
    ckpt = load(checkpoint, arch, arch_kwargs, trust_pickle, key)
    # A dry run shows the decisions even when every layer is skipped.
    decisions = plan_checked(
        ckpt.model,
        include=include,
        exclude=exclude,
        frozen=frozen,
        source=checkpoint.name,
        require_conversion=not dry_run,
    )
    for d in decisions:  # a reason names the library's parameters; show this command's flags
        d.reason = d.reason and with_flags(d.reason, ["convert"])
    converting = [d for d in decisions if d.action == "convert"]
    result = {
        "source": str(checkpoint),
        "layers": [d.to_dict() for d in decisions],
        "converted": len(converting),
        "skipped": len(decisions) - len(converting),
        "output": None,
        "max_abs_diff": None,
        "input_shape": None,
        # read before converting: where the torchrl / sb3-contrib layers stand in their warm-up
        "peer_schedule": peer_record(ckpt.model, [d.name for d in converting if d.peer]) or None,
    }
    if not dry_run:
        try:
            checked = convert_checked(
                ckpt.model,
                input_shape=shape or ckpt.input_shape,
                arch_spec=ckpt.arch_spec,
                momentum=momentum,
                include=include,
                exclude=exclude,
                frozen=frozen,
            )
        except VerificationError as exc:
            raise VerificationError(f"{exc}; nothing written") from None
        shape = checked.input_shape
        _save_converted(checked.model, output, ckpt, shape, result["peer_schedule"], force=force)
        result.update(max_abs_diff=checked.max_abs_diff, input_shape=shape, output=str(output))
    if as_json:
        print_json(result)
        return
    _print_conversion(decisions, result, momentum=momentum, dry_run=dry_run)
    if not dry_run:
        print_wrote_checkpoint(output, ckpt.arch_spec)


def _save_converted(model, output: Path, ckpt, shape, peer_schedule: dict | None, *, force: bool) -> None:
    """Write the brn checkpoint, with the peer layers' warm-up position read before converting (a brn source's
    own record is kept when this conversion found none)."""
    from brn_cli.storage.checkpoint import save_brn_checkpoint

    lineage = ckpt.lineage()
    lineage["peer_schedule"] = peer_schedule or lineage["peer_schedule"]
    save_brn_checkpoint(model, output, force=force, input_shape=shape, command="convert", **lineage)


def _print_conversion(decisions, result: dict, *, momentum: float, dry_run: bool) -> None:
    table = Table()
    for col in ("layer", "from", "to / skipped because"):
        table.add_column(col)
    for d in decisions:
        # Layer names and types come from the file: plain text, never markup.
        table.add_row(
            Text(file_text(d.name)),
            Text(file_text(d.source_type)),
            Text(d.target_type + (f" ({d.peer_position})" if d.peer_position else ""), style="green")
            if d.action == "convert"
            else Text(file_text(d.reason), style="yellow"),
        )
    out.print(table)
    verb = "would convert" if dry_run else "converted"
    out.print(
        f"{verb} {result['converted']} of {len(decisions)} BatchNorm layers (momentum {momentum:g}, "
        "rmax 1, dmax 0: unchanged until a schedule relaxes them)"
    )
    peers = sum(1 for d in decisions if d.peer and d.action == "convert")
    if peers:
        out.print(
            f"{peers} of them torchrl / sb3-contrib renorm layers: their eps, momentum and step counter kept, "
            "limits at their warm-up position (docs/own-loop.md: Coming from torchrl or sb3-contrib)"
        )
        if not dry_run:
            out.print(
                "their warm-up position is recorded in the checkpoint (brn inspect shows it); "
                "RenormScheduler.from_checkpoint continues it in your own loop"
            )
    kept_frozen = [d for d in decisions if d.frozen and d.action != "convert"]
    if kept_frozen:
        advice = (
            "--frozen convert-all converts them too"
            if any("frozen stage" in (d.reason or "") for d in kept_frozen)
            else "--frozen convert converts them"
        )
        kinds = ", ".join(sorted({file_text(d.source_type, 60) for d in kept_frozen}))
        out.print(Text(f"{len(kept_frozen)} frozen norms ({kinds}) kept frozen; {advice}"))
    if not dry_run:
        out.print(
            f"eval outputs on input {result['input_shape']}: "
            f"max |original - converted| = {result['max_abs_diff']:.3g}"
        )
