"""`brn finetune`: its options are the fields of :class:`brn_cli.train.config.FinetuneConfig`.

The command's signature is built from that declaration (:func:`_declared_parameters`): each field becomes
``--field-name`` with the field's default and help, except the few spelled otherwise on the command line
(:data:`_SPECIAL`) and the options several commands share (:data:`_SHARED`, the same flag and help
everywhere). So an option added to the config appears here, and a default lives in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from brn_cli.cli.app import ChannelsOpt, app, out, with_flags
from brn_cli.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    DeviceOpt,
    ForceOpt,
    ImageSizeOpt,
    JsonOpt,
    NormalizeOpt,
    ResizeSizeOpt,
    TrustPickleOpt,
    ValSplitOpt,
    print_json,
)
from brn_cli.errors import BrnError, render_params
from brn_cli.train.config import FinetuneConfig

# The order of the options in `brn finetune --help`; `nproc` and `as_json` belong to the command alone.
_ORDER = (
    "checkpoint data output arch arch_kwargs trust_pickle steps epochs batch_size lr optimizer weight_decay "
    "lr_schedule warmup_steps momentum rmax_schedule dmax_schedule seed eval_every save_every log_every "
    "microbatch sampler val_split normalize image_size resize_size channels augment task loss metric "
    "ignore_index embedding_loss margin recall_k device amp "
    "channels_last compile num_workers resume stats_sync nproc dist_timeout as_json force"
).split()
_SHARED = {
    "arch": ArchOpt,
    "arch_kwargs": ArchKwargsOpt,
    "trust_pickle": TrustPickleOpt,
    "val_split": ValSplitOpt,
    "normalize": NormalizeOpt,
    "image_size": ImageSizeOpt,
    "resize_size": ResizeSizeOpt,
    "channels": ChannelsOpt,
    "device": DeviceOpt,
    "force": ForceOpt,
    "as_json": JsonOpt,
}
# Fields typed or spelled otherwise on the command line: (type, extra flag names); all default to None.
_SPECIAL = {
    "checkpoint": (Path | None, None),
    "data": (str | None, ()),
    "output": (Path | None, ("-o",)),
    "resume": (Path | None, ()),
}
_REQUIRED = {
    "checkpoint": "missing CHECKPOINT (the model to fine-tune), or pass --resume RUNDIR",
    "data": "missing --data (an .npz, an image folder or package.module:callable)",
    "output": "missing -o/--output (the run folder)",
}
_NPROC_HELP = "Launch N processes on this machine (torchrun); `batch_size` is per process."


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(text: str) -> str:
    """Help written in parameter terms (`batch_size`) in command-line terms (--batch-size)."""
    return render_params(text, lambda name, value: _flag(name) if value is None else f"{_flag(name)} {value}")


def _parameter(name: str, field: dataclasses.Field | None, hints: dict[str, Any]) -> inspect.Parameter:
    """One option of the command, from its config field (or the command's own `nproc`)."""
    kind, default = inspect.Parameter.KEYWORD_ONLY, None
    if name in _SHARED:
        annotation, default = _SHARED[name], field.default if field is not None else False
    elif name == "nproc":
        annotation = Annotated[int | None, typer.Option("--nproc", help=_help(_NPROC_HELP))]
    elif name in _SPECIAL:
        kind_type, extra = _SPECIAL[name]
        info = (
            typer.Argument(help=_help(field.metadata["help"]))
            if extra is None
            else typer.Option(*extra, _flag(name), help=_help(field.metadata["help"]))
        )
        annotation = Annotated[kind_type, info]
    else:
        info = typer.Option(_flag(name), help=_help(field.metadata["help"]))
        annotation, default = Annotated[hints[name], info], field.default
    return inspect.Parameter(name, kind, default=default, annotation=annotation)


def _declared_parameters() -> list[inspect.Parameter]:
    fields = {f.name: f for f in dataclasses.fields(FinetuneConfig) if f.metadata.get("cli", True)}
    hints = typing.get_type_hints(FinetuneConfig)
    missing = set(fields) - set(_ORDER)
    assert not missing, f"FinetuneConfig fields without a place in `brn finetune`: {sorted(missing)}"
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    return [context] + [_parameter(name, fields.get(name), hints) for name in _ORDER]


def _with_declared_options(command):
    """Give `command` (ctx, **options) the signature built from the declaration, for typer to read."""
    signature = inspect.Signature(_declared_parameters())
    command.__signature__ = signature
    command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return command


def _given_on_command_line(ctx: typer.Context) -> list[str]:
    """The config fields set on this command line (a resume may change only some, see the config)."""
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return [
        p.name
        for p in ctx.command.params
        if p.name in fields and getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"
    ]


@app.command("finetune")
@_with_declared_options
def finetune_cmd(ctx: typer.Context, **options: Any) -> None:
    """Fine-tune with Batch Renormalization: schedules, non-i.i.d. batches, resumable run folder."""
    from brn_cli.cli.progress import progress_if
    from brn_cli.storage.checkpoint import parse_arch_kwargs
    from brn_cli.train.distributed import launched_by_torchrun
    from brn_cli.train.finetune import run_finetune
    from brn_cli.train.launch import launch_finetune

    nproc, as_json, resume = options.pop("nproc"), options.pop("as_json"), options["resume"]
    if resume is None:
        for name, message in _REQUIRED.items():
            if options[name] is None:
                raise BrnError(message)
    config = FinetuneConfig(
        **{
            **options,
            "checkpoint": str(options["checkpoint"] or ""),
            "data": options["data"] or "",
            "output": str(options["output"] if options["output"] is not None else resume),
            "arch_kwargs": parse_arch_kwargs(options["arch_kwargs"]) or None,
            "resume": str(resume) if resume is not None else None,
            "resume_overrides": _given_on_command_line(ctx) if resume is not None else None,
        }
    )
    if nproc is not None and nproc < 1:
        raise BrnError(f"--nproc must be >= 1, got {nproc}")
    if nproc is not None and nproc > 1 and launched_by_torchrun():
        raise BrnError("--nproc launches torchrun itself; under torchrun leave it out")
    if nproc is not None and nproc > 1:
        result = launch_finetune(config, nproc, progress=not as_json)  # rank 0 shows the progress
    else:
        with _notes_in_command_terms():
            result = run_finetune(config, progress=progress_if(not as_json, transient=False))
        if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
            return
    if as_json:
        print_json(_summary(result))
        return
    for line in _report_lines(result):
        out.print(line)


@contextlib.contextmanager
def _notes_in_command_terms():
    """Show the run's notes to the user (warnings naming the library's parameters) as one stderr line each,
    in this command's flags."""
    from brn_cli.train.schedule import PeerWarmupNotContinued

    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, PeerWarmupNotContinued):
                return shown(message, category, filename, lineno, file, line)
            sys.stderr.write(f"note: {with_flags(str(message), ['finetune'])}\n")

        warnings.showwarning = show
        yield


def _summary(result) -> dict[str, Any]:
    return {
        "run_dir": result.run_dir,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "device": result.device,
        "seconds": result.seconds,
        "final": result.final,
        "best": result.best,
        "metrics": result.metrics_path,
        "files": result.files,
    }


def _report_lines(result) -> list[str]:
    f, lines, metric = result.final, [], getattr(result, "metric", "accuracy")
    if result.resumed_from is not None:
        lines.append(f"resumed from step {result.resumed_from}")
    line = f"step {result.steps}: train loss {f['train_loss']:.4f}" if f.get("train_loss") is not None else ""
    label = "accuracy" if metric == "accuracy" else metric
    if f.get(f"val_{metric}") is not None:
        line += f", val {label} {100 * f[f'val_{metric}']:.2f}% (inference mode)"
    if line:
        lines.append(line)
    if result.best.get(f"val_{metric}") is not None:
        lines.append(f"best: {100 * result.best[f'val_{metric}']:.2f}% at step {result.best['step']}")
    lines.append(
        f"wrote {result.run_dir}/ ({', '.join(result.files)}) on {result.device} in {result.seconds:.1f} s"
    )
    return lines
