"""The `brn` command line: parses options, calls the library, prints results.

Logic lives in the library modules; this file only translates between them and the terminal. torch is
imported inside the commands so that `brn --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import BrnError, first_line

if TYPE_CHECKING:  # torch-heavy modules are imported inside the commands
    from .checkpoint import LoadedCheckpoint

app = typer.Typer(
    name="brn",
    help="Batch Renormalization for existing PyTorch BatchNorm models: inspect, convert, fine-tune, "
    "calibrate, evaluate and export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
export_app = typer.Typer(
    help="Export a checkpoint: ONNX (folded, verified) or a plain BatchNorm state_dict.", no_args_is_help=True
)
app.add_typer(export_app, name="export")

# Piped output is not truncated to 80 columns: tables stay readable in logs and CI.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)
DEBUG = {"on": False}

# ----------------------------------------------------------------------------------------------
# Shared options
# ----------------------------------------------------------------------------------------------

CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint: brn checkpoint, state_dict (.pt/.pth/.bin), "
        ".safetensors, or a pickled module (with --trust-pickle)."
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Architecture for plain state_dicts: torchvision:NAME, timm:NAME or package.module:callable.",
    ),
]
ArchKwargsOpt = Annotated[
    str | None,
    typer.Option("--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'."),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow loading pickled Python objects (can run arbitrary code: only for files you trust).",
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="Top-level key holding the state_dict, when the "
        "default search (state_dict, model_state_dict, model, "
        "state_dict_ema) picks the wrong one.",
    ),
]
InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="Sample input shape, e.g. 2,3,224,224 (default: recorded in the checkpoint or inferred).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]


def parse_shape(text: str | None) -> list[int] | None:
    """'2,3,224,224' or '2x3x224x224' -> [2, 3, 224, 224]."""
    if text is None:
        return None
    parts = text.replace("x", ",").replace(" ", "").strip(",").split(",")
    try:
        shape = [int(p) for p in parts if p]
    except ValueError:
        raise BrnError(f"--input-shape {text!r}: expected integers like 2,3,224,224") from None
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise BrnError(f"--input-shape {text!r}: need at least (batch, features), all positive")
    return shape


def load(
    checkpoint: Path, arch: str | None, arch_kwargs: str | None, trust_pickle: bool, key: str | None = None
) -> LoadedCheckpoint:
    from .checkpoint import load_checkpoint, parse_arch_kwargs

    return load_checkpoint(
        checkpoint,
        arch=arch,
        arch_kwargs=parse_arch_kwargs(arch_kwargs),
        trust_pickle=trust_pickle,
        state_key=key,
    )


def checkpoint_preprocessing(
    ckpt: LoadedCheckpoint,
    data: str,
    normalize: str | None,
    image_size: int | None = None,
    resize_size: int | None = None,
) -> dict[str, Any]:
    """load_data's preprocessing options: those given, else those the checkpoint was fine-tuned with (said on
    stderr; a model scores at chance on inputs prepared differently)."""
    from .data import is_image_folder, resolve_normalize

    recorded = ckpt.preprocessing
    chosen = resolve_normalize(normalize, recorded.get("normalize"))
    if normalize is None and chosen is not None:
        err.print(
            f"note: inputs normalized with {chosen}, as recorded in {ckpt.path.name} (--normalize to change)"
        )
    if image_size is None and recorded.get("image_size") and is_image_folder(data):
        image_size = int(recorded["image_size"])
        resize_size = resize_size if resize_size is not None else recorded.get("resize_size")
        err.print(
            f"note: images resized to {resize_size} and center-cropped to {image_size}, as recorded in "
            f"{ckpt.path.name} (--image-size to change)"
        )
    return {"normalize": chosen, "image_size": image_size, "resize_size": resize_size}


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        sys.stdout.write(f"brn {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        # Eager: handled while the options are parsed, so it needs no command (a plain option of the group
        # callback would only run once a command is given: "Missing command.").
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Global options. Add --debug anywhere to see tracebacks."""


# ----------------------------------------------------------------------------------------------
# inspect / convert
# ----------------------------------------------------------------------------------------------


def file_text(text: object, limit: int = 200) -> str:
    """A string read from a checkpoint, made safe to print: control characters escaped, cut at `limit`.
    Print it in a rich Text, never as markup."""
    from .checkpoint import printable

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
    from .inspection import inspect_model

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
    if not report.norms:
        out.print("no normalization layers")
        return
    table = Table(show_lines=False)
    for col in ("layer", "type", "C", "eps", "momentum", "fold into / why not", "running stats"):
        table.add_column(col)
    for n in report.norms:
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
        )
    out.print(table)
    foldable = sum(1 for n in report.norms if n.fold_into)
    unhealthy = sum(1 for n in report.norms if n.health not in ("ok", "no running stats"))
    out.print(
        f"{len(report.norms)} normalization layers, {foldable} foldable, "
        f"{unhealthy} with unhealthy running statistics"
    )


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
    input_shape: InputShapeOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would convert; write nothing.")
    ] = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Replace BatchNorm layers by Batch Renorm (eval outputs unchanged) and write a brn checkpoint."""
    import copy

    from .atomic import check_writable
    from .checkpoint import save_brn_checkpoint
    from .convert import (
        check_convertible,
        convert_batchnorm,
        infer_input_shape,
        max_eval_difference,
        plan_conversion,
    )
    from .errors import VerificationError

    if not 0.0 < momentum <= 1.0:
        raise BrnError(f"--momentum must be in (0, 1], got {momentum}")
    if output is None and not dry_run:
        raise BrnError("missing -o/--output (or pass --dry-run)")
    if output is not None and not dry_run:
        check_writable(output, force=force)
    shape = parse_shape(input_shape)
    ckpt = load(checkpoint, arch, arch_kwargs, trust_pickle, key)
    model = ckpt.model
    decisions = plan_conversion(model, include=include, exclude=exclude)
    converting = [d for d in decisions if d.action == "convert"]
    result = {
        "source": str(checkpoint),
        "layers": [d.to_dict() for d in decisions],
        "converted": len(converting),
        "skipped": len(decisions) - len(converting),
        "output": None,
        "max_abs_diff": None,
        "input_shape": None,
    }
    if not decisions:
        raise BrnError(
            f"{checkpoint.name}: the model has no BatchNorm layers with running statistics; "
            "nothing to convert"
        )
    if not dry_run and not converting:
        reasons = sorted({d.reason for d in decisions if d.reason})
        raise BrnError(f"no layer converted: all {len(decisions)} skipped ({'; '.join(reasons)})")
    check_convertible(model, decisions)  # a dry run says so too: NaN/inf statistics or eps <= 0, by layer

    if not dry_run:
        original = copy.deepcopy(model)
        convert_batchnorm(model, momentum=momentum, include=include, exclude=exclude)
        shape = shape or ckpt.input_shape or infer_input_shape(model, arch_spec=ckpt.arch_spec)
        if shape is None:
            raise BrnError("cannot infer an input shape from the first layer; pass --input-shape")
        try:
            diff = max_eval_difference(original, model, shape)
        except Exception as exc:
            raise BrnError(
                f"the model does not run on input shape {shape} ({type(exc).__name__}: "
                f"{first_line(exc)}); pass --input-shape"
            ) from None
        result.update(max_abs_diff=diff, input_shape=shape)
        if not diff <= 1e-5:
            raise VerificationError(
                f"conversion changed eval outputs by {diff:.3g} (expected 0); nothing written"
            )
        save_brn_checkpoint(
            model,
            output,
            force=force,
            input_shape=shape,
            command="convert",
            **ckpt.lineage(),
        )
        result["output"] = str(output)

    if as_json:
        print_json(result)
        return
    table = Table()
    for col in ("layer", "from", "to / skipped because"):
        table.add_column(col)
    for d in decisions:
        table.add_row(
            d.name,
            d.source_type,
            f"[green]{d.target_type}[/green]" if d.action == "convert" else f"[yellow]{d.reason}[/yellow]",
        )
    out.print(table)
    verb = "would convert" if dry_run else "converted"
    out.print(
        f"{verb} {len(converting)} of {len(decisions)} BatchNorm layers (momentum {momentum:g}, "
        "rmax 1, dmax 0: unchanged until a schedule relaxes them)"
    )
    if not dry_run:
        out.print(f"eval outputs on input {shape}: max |original - converted| = {result['max_abs_diff']:.3g}")
        if ckpt.arch_spec is None:
            out.print("[yellow]note: no --arch given, so later commands on this file need --arch[/yellow]")
        out.print(f"wrote {output} ({human_size(Path(output).stat().st_size)})")


# ----------------------------------------------------------------------------------------------
# schedule / evaluate / calibrate (data, schedule, evaluate, calibrate modules)
# ----------------------------------------------------------------------------------------------
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Data: .npz (x_train, y_train[, x_val, y_val]), a folder with train/ and val/, "
        "or package.module:callable returning (train, val).",
    ),
]
ValSplitOpt = Annotated[
    float | None,
    typer.Option("--val-split", help="Hold out this fraction of train when there is no val set."),
]
NormalizeOpt = Annotated[
    str | None,
    typer.Option(
        "--normalize",
        help="MEAN,STD (or M1,M2,M3,S1,S2,S3) applied after /255; 'none' for none. evaluate and calibrate "
        "default to the normalization recorded in a fine-tuned checkpoint.",
    ),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        help="ImageFolder data: center-crop S x S after resizing the shorter side to --resize-size. evaluate "
        "and calibrate default to the size recorded in a fine-tuned checkpoint.",
    ),
]
ResizeSizeOpt = Annotated[
    int | None,
    typer.Option("--resize-size", help="Shorter side before the --image-size crop (default S / 0.875)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the batch order and of --val-split.")]
ChannelsOpt = Annotated[
    int | None,
    typer.Option(
        "--channels",
        help="Image folders: load images as 1 (grayscale) or 3 (RGB) channels (default: the input channels of "
        "the model's first convolution, else 3).",
    ),
]


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
    from .atomic import check_writable
    from .schedule import PRESETS, parse_schedule, plot_schedules, preset_schedules, schedule_table

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


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: CheckpointArg,
    data: DataOpt,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Examples per batch (default 256, or every example when fewer; with --sampler grouped:K, "
            "K x min(256 // K, number of labels), the largest batch that sampler can form).",
        ),
    ] = None,
    batch_stats: Annotated[
        bool,
        typer.Option("--batch-stats", help="Also score with minibatch statistics (the train/inference gap)."),
    ] = False,
    sampler: Annotated[
        str, typer.Option("--sampler", help="Batches for --batch-stats: iid or grouped:K (K per label).")
    ] = "iid",
    device: DeviceOpt = "auto",
    val_split: ValSplitOpt = None,
    normalize: NormalizeOpt = None,
    image_size: ImageSizeOpt = None,
    resize_size: ResizeSizeOpt = None,
    channels: ChannelsOpt = None,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Inference-mode loss and accuracy on the validation split (and with --batch-stats, minibatch-stats)."""
    from .data import load_data, parse_sampler
    from .evaluate import evaluate_data, resolve_device

    sampler = parse_sampler(sampler)
    dev = resolve_device(device)
    ckpt = load(checkpoint, arch, arch_kwargs, trust_pickle, key)
    bundle = load_data(
        data,
        val_split=val_split,
        seed=seed,
        channels=channels,
        **checkpoint_preprocessing(ckpt, data, normalize, image_size, resize_size),
    )
    result = evaluate_data(
        ckpt.model,
        bundle,
        batch_size=batch_size,
        batch_stats=batch_stats,
        sampler=sampler,
        seed=seed,
        device=dev,
        progress=not as_json,
    )
    result.update(checkpoint=str(checkpoint), data=bundle.description, device=str(dev))
    if as_json:
        print_json(result)
        return
    out.print(f"[bold]{checkpoint}[/bold]  on {bundle.description}")
    table = Table()
    for col in ("mode", "batches", "examples", "loss", "accuracy"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    inf = result["inference"]
    table.add_row(
        "inference (moving averages)",
        str(inf["batches"]),
        str(inf["examples"]),
        f"{inf['loss']:.4f}",
        f"{100 * inf['accuracy']:.2f}%",
    )
    bs = result["batch_stats"]
    if bs is not None:
        table.add_row(
            f"minibatch statistics ({bs['sampler']}, batch {bs['batch_size']})",
            str(bs["batches"]),
            str(bs["examples"]),
            f"{bs['loss']:.4f}",
            f"{100 * bs['accuracy']:.2f}%",
        )
    out.print(table)
    if bs is not None:
        out.print(
            f"train/inference gap: minibatch-stats minus inference accuracy = "
            f"{100 * result['gap']:+.2f} points"
        )


@app.command("calibrate")
def calibrate_cmd(
    checkpoint: CheckpointArg,
    data: DataOpt,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output brn checkpoint.")],
    batches: Annotated[int, typer.Option("--batches", help="Batches to average over (exactly).")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per batch.")] = 64,
    split: Annotated[str, typer.Option("--split", help="train or val.")] = "train",
    device: DeviceOpt = "auto",
    val_split: ValSplitOpt = None,
    normalize: NormalizeOpt = None,
    image_size: ImageSizeOpt = None,
    resize_size: ResizeSizeOpt = None,
    channels: ChannelsOpt = None,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Re-estimate every norm layer's mu and sigma exactly over N batches; write a new brn checkpoint."""
    from .atomic import check_writable
    from .calibrate import calibrate_data
    from .checkpoint import save_brn_checkpoint
    from .convert import infer_input_shape
    from .data import load_data, preprocessing_record
    from .evaluate import resolve_device

    check_writable(output, force=force)
    dev = resolve_device(device)
    ckpt = load(checkpoint, arch, arch_kwargs, trust_pickle, key)
    preprocessing = checkpoint_preprocessing(ckpt, data, normalize, image_size, resize_size)
    bundle = load_data(data, val_split=val_split, seed=seed, channels=channels, **preprocessing)
    shifts, used = calibrate_data(
        ckpt.model,
        bundle,
        num_batches=batches,
        batch_size=batch_size,
        split=split,
        seed=seed,
        device=dev,
        progress=not as_json,
    )
    model = ckpt.model.cpu()
    shape = ckpt.input_shape or infer_input_shape(model, arch_spec=ckpt.arch_spec)
    save_brn_checkpoint(
        model,
        output,
        force=force,
        input_shape=shape,
        command="calibrate",
        # The statistics were measured on inputs prepared this way: the new checkpoint records that.
        **{**ckpt.lineage(), "preprocessing": preprocessing_record(**preprocessing)},
    )
    result = {
        "source": str(checkpoint),
        "output": str(output),
        "data": bundle.description,
        "split": split,
        "batches": used,
        "batches_requested": batches,
        "batch_size": batch_size,
        "layers": [s.to_dict() for s in shifts],
    }
    if as_json:
        print_json(result)
        return
    table = Table()
    for col in ("layer", "C", "max |mu shift|", "sigma new/old (min..max)"):
        table.add_column(col)
    for s in shifts:
        table.add_row(
            s.name, str(s.channels), f"{s.mean_shift:.4g}", f"{s.min_sigma_ratio:.4f}..{s.sigma_ratio:.4f}"
        )
    out.print(table)
    note = f" (only {used} full batches of {batch_size} in the {split} split)" if used < batches else ""
    out.print(f"calibrated {len(shifts)} layers over {used} batches x {batch_size} examples{note}")
    if ckpt.arch_spec is None:
        out.print("[yellow]note: no --arch given, so later commands on this file need --arch[/yellow]")
    out.print(f"wrote {output} ({human_size(Path(output).stat().st_size)})")


# ----------------------------------------------------------------------------------------------
# finetune (finetune and distributed modules)
# ----------------------------------------------------------------------------------------------


@app.command("finetune")
def finetune_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="BatchNorm or brn checkpoint to fine-tune (BatchNorm layers are converted on the fly). "
            "Not needed with --resume."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Data: .npz (x_train, y_train[, x_val, y_val]), a folder with train/ and val/, "
            "or package.module:callable returning (train, val). With --resume: the run's data at a new "
            "location (checked to be the same data).",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Run folder: last.pt, best.pt, metrics.jsonl, ...")
    ] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps to run.")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Or: passes over the data.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per step (per process).")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 0.01,
    optimizer: Annotated[
        str, typer.Option("--optimizer", help="sgd (Nesterov 0.9), adamw or rmsprop.")
    ] = "sgd",
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="Decoupled for adamw; not applied to biases/norms.")
    ] = 0.0,
    lr_schedule: Annotated[
        str, typer.Option("--lr-schedule", help="cosine, linear or constant (after warm-up).")
    ] = "cosine",
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear LR warm-up steps.")] = 0,
    momentum: Annotated[
        float, typer.Option("--momentum", help="Rate of the moving mu/sigma (the paper's alpha).")
    ] = 0.01,
    rmax_schedule: Annotated[
        str,
        typer.Option("--rmax-schedule", help="paper-scaled, paper, off (plain batchnorm), or STEP:VALUE,..."),
    ] = "paper-scaled",
    dmax_schedule: Annotated[
        str | None,
        typer.Option("--dmax-schedule", help="As --rmax-schedule (default: the same preset)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order, dropout and --val-split.")] = 0,
    eval_every: Annotated[
        int, typer.Option("--eval-every", help="Validate (inference mode) every N steps; 0: at the end.")
    ] = 0,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Write last.pt every N steps (0: at the end).")
    ] = 0,
    log_every: Annotated[int, typer.Option("--log-every", help="Steps per metrics.jsonl train record.")] = 10,
    microbatch: Annotated[
        int | None,
        typer.Option("--microbatch", help="Normalize groups of K examples separately (paper section 4.2)."),
    ] = None,
    sampler: Annotated[
        str,
        typer.Option("--sampler", help="iid, or grouped:K (batch/K labels, K examples each; section 4.3)."),
    ] = "iid",
    val_split: ValSplitOpt = None,
    normalize: NormalizeOpt = None,
    image_size: ImageSizeOpt = None,
    resize_size: ResizeSizeOpt = None,
    channels: ChannelsOpt = None,
    augment: Annotated[
        str,
        typer.Option(
            "--augment",
            help="Training images: none, flip, or crop-flip (random resized crop, then flip). Seeded per "
            "example and epoch, so resume and workers do not change it.",
        ),
    ] = "none",
    device: DeviceOpt = "auto",
    amp: Annotated[
        str, typer.Option("--amp", help="off, bf16 or fp16 (fp16: with a GradScaler; meant for GPUs).")
    ] = "off",
    channels_last: Annotated[bool, typer.Option("--channels-last", help="NHWC memory format.")] = False,
    compile_model: Annotated[
        bool, typer.Option("--compile", help="torch.compile the training forward.")
    ] = False,
    num_workers: Annotated[int, typer.Option("--num-workers", help="DataLoader worker processes.")] = 0,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the run in this folder exactly (its settings are kept)."),
    ] = None,
    stats_sync: Annotated[
        str,
        typer.Option(
            "--stats-sync",
            help="Several processes: global (batch statistics over all ranks) or local (each rank its own "
            "minibatch, moving averages shared; the paper's section 4).",
        ),
    ] = "global",
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc", help="Launch N processes on this machine (torchrun); --batch-size is per process."
        ),
    ] = None,
    dist_timeout: Annotated[
        float,
        typer.Option("--dist-timeout", help="Seconds to wait for the other ranks before giving up."),
    ] = 300.0,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Fine-tune with Batch Renormalization: schedules, non-i.i.d. batches, resumable run folder."""
    from .finetune import FinetuneConfig, run_finetune

    if resume is not None:
        # The library decides what may change on --resume; it needs to know which options were given.
        names = {"compile_model": "compile", "as_json": None, "nproc": None}
        given_options = [
            names.get(p.name, p.name)
            for p in ctx.command.params
            if names.get(p.name, p.name) is not None
            and getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"
        ]
    else:
        if checkpoint is None:
            raise BrnError("missing CHECKPOINT (the model to fine-tune), or pass --resume RUNDIR")
        if data is None:
            raise BrnError("missing --data (an .npz, an image folder or package.module:callable)")
        if output is None:
            raise BrnError("missing -o/--output (the run folder)")
    from .checkpoint import parse_arch_kwargs

    config = FinetuneConfig(
        checkpoint=str(checkpoint or ""),
        data=data or "",
        output=str(output if output is not None else resume),
        arch=arch,
        arch_kwargs=parse_arch_kwargs(arch_kwargs) or None,
        trust_pickle=trust_pickle,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        lr_schedule=lr_schedule,
        warmup_steps=warmup_steps,
        momentum=momentum,
        rmax_schedule=rmax_schedule,
        dmax_schedule=dmax_schedule,
        seed=seed,
        eval_every=eval_every,
        save_every=save_every,
        microbatch=microbatch,
        sampler=sampler,
        val_split=val_split,
        normalize=normalize,
        image_size=image_size,
        resize_size=resize_size,
        channels=channels,
        augment=augment,
        device=device,
        amp=amp,
        channels_last=channels_last,
        compile=compile_model,
        num_workers=num_workers,
        force=force,
        resume=str(resume) if resume is not None else None,
        log_every=log_every,
        stats_sync=stats_sync,
        dist_timeout=dist_timeout,
        resume_overrides=given_options if resume is not None else None,
    )
    import os

    from .distributed import launch_finetune, launched_by_torchrun

    if nproc is not None and nproc < 1:
        raise BrnError(f"--nproc must be >= 1, got {nproc}")
    if nproc is not None and nproc > 1 and launched_by_torchrun():
        raise BrnError("--nproc launches torchrun itself; under torchrun leave it out")
    if nproc is not None and nproc > 1:
        # Rank 0 shows the progress; the summary comes back here.
        result = launch_finetune(config, nproc, progress=not as_json)
    else:
        result = run_finetune(config, progress=not as_json)
        if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
            return
    if as_json:
        print_json(
            {
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
        )
        return
    f = result.final
    if result.resumed_from is not None:
        out.print(f"resumed from step {result.resumed_from}")
    line = f"step {result.steps}: train loss {f['train_loss']:.4f}" if f.get("train_loss") is not None else ""
    if f.get("val_accuracy") is not None:
        line += f", val accuracy {100 * f['val_accuracy']:.2f}% (inference mode)"
    if line:
        out.print(line)
    if result.best.get("val_accuracy") is not None:
        out.print(f"best: {100 * result.best['val_accuracy']:.2f}% at step {result.best['step']}")
    out.print(
        f"wrote {result.run_dir}/ ({', '.join(result.files)}) on {result.device} in {result.seconds:.1f} s"
    )


# ----------------------------------------------------------------------------------------------
# export onnx / export state-dict (fold, export, statedict modules)
# ----------------------------------------------------------------------------------------------


def _export_progress():
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


def _print_export_report(report) -> None:
    fold = report.fold
    if fold is None:
        out.print("folding: off (--no-fold)")
    else:
        out.print(
            f"folded {len(fold.folded)} norm layers into their producers; "
            f"kept {len(fold.kept)} as per-channel scale-and-shift"
        )
        if fold.kept:
            table = Table()
            table.add_column("kept norm")
            table.add_column("why it could not fold")
            for name, reason in fold.kept:
                table.add_row(name, f"[yellow]{reason}[/yellow]")
            out.print(table)
    if report.op_counts:
        ops = ", ".join(f"{op} {n}" for op, n in list(report.op_counts.items())[:10])
        out.print(f"ONNX ops: {ops}  (BatchNormalization: {report.batchnorm_nodes})")
    if report.verify is not None:
        v = report.verify
        out.print(f"verification against the PyTorch eval model (atol {v.atol:g}, rtol {v.rtol:g}):")
        for c in v.checks:
            mark = "[green]✓[/green]" if c.passed else "[red]✗[/red]"
            top1 = f", top-1 agreement {c.top1:.0%}" if c.top1 is not None else ""
            out.print(
                f"  {mark} {c.provider}, ORT optimizations {c.optimization}, batch {c.batch} "
                f"({c.inputs} inputs): max abs {c.max_abs:.3g}, max rel {c.max_rel:.3g}{top1}"
            )
    if report.benchmark is not None:
        b = report.benchmark
        out.print(
            f"ORT latency, folded vs unfolded export (CPU, {b.threads} thread, batch {b.batch}, "
            f"median of {b.repeats} interleaved runs):"
        )
        for level, ms in b.median_ms.items():
            out.print(
                f"  optimizations {level}: folded {ms['folded']:.2f} ms, unfolded {ms['unfolded']:.2f} ms, "
                f"unfolded/folded {b.ratio(level):.2f}x"
            )


@export_app.command("onnx")
def export_onnx_cmd(
    checkpoint: CheckpointArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .onnx file.")],
    input_shape: InputShapeOpt = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version.")] = 18,
    fp16: Annotated[bool, typer.Option("--fp16", help="Export in float16 (cast after folding).")] = False,
    no_fold: Annotated[
        bool, typer.Option("--no-fold", help="Keep norms as BatchNormalization nodes (no folding).")
    ] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the onnxruntime comparison (not recommended).")
    ] = False,
    atol: Annotated[
        float | None, typer.Option("--atol", help="Absolute tolerance (default 1e-4; 1e-2 with --fp16).")
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option(
            "--rtol",
            help="Tolerance relative to each output's largest |value| (default 1e-4; 1e-2 with --fp16).",
        ),
    ] = None,
    benchmark: Annotated[
        bool, typer.Option("--benchmark", help="Time ORT on the folded graph against an unfolded export.")
    ] = False,
    exporter: Annotated[
        str, typer.Option("--exporter", help="legacy (TorchScript, fast) or dynamo (torch.export).")
    ] = "legacy",
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold norms into their producers, export one ONNX file and verify it with onnxruntime."""
    from .atomic import check_writable
    from .convert import infer_input_shape
    from .errors import VerificationError
    from .export import EXPORTERS, export_onnx_checked

    if exporter not in EXPORTERS:
        raise BrnError(f"--exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    check_writable(output, force=force)
    ckpt = load(checkpoint, arch, arch_kwargs, trust_pickle, key)
    shape = (
        parse_shape(input_shape)
        or ckpt.input_shape
        or infer_input_shape(ckpt.model, arch_spec=ckpt.arch_spec)
    )
    if shape is None:
        raise BrnError("cannot infer an input shape; pass --input-shape, e.g. 2,3,224,224")
    stages = 2 + (not no_fold) + (not no_verify) + benchmark
    with _export_progress() as progress:
        task = progress.add_task("loading", total=stages)

        def step(text: str) -> None:
            progress.update(task, description=text, advance=1)

        report = export_onnx_checked(
            ckpt.model,
            shape,
            output,
            fold=not no_fold,
            fp16=fp16,
            opset=opset,
            exporter=exporter,
            verify=not no_verify,
            atol=atol,
            rtol=rtol,
            benchmark=benchmark,
            force=force,
            step=step,
        )
    if as_json:
        print_json(report.to_dict())
    else:
        _print_export_report(report)
    if not report.written:
        v = report.verify
        raise VerificationError(
            f"verification failed: max abs error {v.max_abs:.3g} beyond --atol {v.atol:g} / --rtol {v.rtol:g}; "
            f"{output} not written"
        )
    if not as_json:
        out.print(
            f"wrote {output} ({human_size(report.size_bytes)}"
            f"{', weights in ' + output.name + '.data' if report.external_data else ''}) "
            f"in {report.export_seconds:.2f} s export ({report.exporter} exporter, opset {report.opset}, "
            f"input {shape}, batch dynamic{', fp16' if fp16 else ''})"
        )


@export_app.command("state-dict")
def export_state_dict_cmd(
    checkpoint: CheckpointArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file (.pth/.pt or .safetensors).")],
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="pt or safetensors (default: from the output suffix, else pt)."),
    ] = None,
    input_shape: InputShapeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the weights as a plain BatchNorm state_dict that loads strict into the original model class."""
    from .atomic import check_writable
    from .checkpoint import build_arch
    from .convert import infer_input_shape
    from .errors import VerificationError
    from .statedict import FORMATS, check_state_dict_roundtrip, export_state_dict, plain_state_dict

    fmt = fmt or ("safetensors" if output.suffix == ".safetensors" else "pt")
    if fmt not in FORMATS:
        raise BrnError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_writable(output, force=force)
    ckpt = load(checkpoint, arch, arch_kwargs, trust_pickle, key)
    model = ckpt.model.eval()
    check = None
    if ckpt.arch_spec is not None:
        shape = (
            parse_shape(input_shape) or ckpt.input_shape or infer_input_shape(model, arch_spec=ckpt.arch_spec)
        )
        fresh = build_arch(ckpt.arch_spec, ckpt.arch_kwargs)
        check = check_state_dict_roundtrip(plain_state_dict(model), fresh, model, shape)
        diff = check["max_abs_diff"]
        if diff is not None and not diff <= 1e-5:
            raise VerificationError(
                f"the plain model's eval outputs differ by {diff:.3g} from the checkpoint's; nothing written"
            )
    path, state = export_state_dict(model, output, fmt=fmt, force=force)
    result = {
        "output": str(path),
        "format": fmt,
        "tensors": len(state),
        "size_bytes": path.stat().st_size,
        "arch": ckpt.arch_spec,
        "roundtrip": check,
    }
    if as_json:
        print_json(result)
        return
    if check is None:
        out.print(
            "[yellow]no architecture recorded: strict-load check skipped (pass --arch to run it)[/yellow]"
        )
    else:
        diff = check["max_abs_diff"]
        out.print(
            f"[green]✓[/green] loads with strict=True into {ckpt.arch_spec}"
            + (f"; eval outputs max |diff| = {diff:.3g}" if diff is not None else "")
        )
    out.print(f"wrote {path} ({fmt}, {len(state)} tensors, {human_size(result['size_bytes'])})")


# ----------------------------------------------------------------------------------------------
# demo / reproduce / bench
# ----------------------------------------------------------------------------------------------

ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", help="torch threads (default 1: fastest on a busy CPU; at most the cores)."),
]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


@app.command("demo")
def demo_cmd(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder for everything the demo writes.")
    ] = Path("brn-demo"),
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Seconds-long run of the same flow (too short to compare).")
    ] = False,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Fine-tuning steps per run (default 400).")
    ] = None,
    pretrain_steps: Annotated[
        int | None, typer.Option("--pretrain-steps", help="BatchNorm pretraining steps (default 300).")
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option("--sampler", help="Batch composition while fine-tuning (default grouped:32)."),
    ] = None,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """The whole flow on the bundled digits: inspect, convert, fine-tune batchnorm vs renorm, evaluate, export."""
    from rich.rule import Rule

    from .demo import DemoConfig, run_demo

    base = DemoConfig.quick() if quick else DemoConfig()
    overrides = {"steps": steps, "pretrain_steps": pretrain_steps, "sampler": sampler}
    config = DemoConfig(
        **{
            **base.__dict__,
            **{k: v for k, v in overrides.items() if v is not None},
            "output": str(output),
            "device": device,
            "threads": threads,
            "seed": seed,
            "force": force,
        }
    )
    quiet = as_json

    def stage(title: str) -> None:
        if not quiet:
            out.print(Rule(f"[bold]{title}", align="left"))

    def note(text: str) -> None:
        if not quiet:
            out.print(f"  {text}")

    result = run_demo(config, stage=stage, note=note, progress=not quiet)
    if as_json:
        print_json(result.to_dict())
        return
    out.print(Rule("[bold]result", align="left"))
    table = Table(title=f"fine-tuned {config.steps} steps on {config.sampler} batches (seed {config.seed})")
    table.add_column("")
    for method in result.runs:
        table.add_column(method, justify="right")
    runs = list(result.runs.values())
    rows = [
        ("schedule", [r.schedule for r in runs]),
        (
            "inference accuracy (moving averages)",
            [f"[bold]{_pct(r.inference_accuracy)}[/bold]" for r in runs],
        ),
        (
            f"batch-statistics accuracy ({config.sampler} test batches)",
            [_pct(r.batch_stats_accuracy) for r in runs],
        ),
        ("train accuracy, last steps (training mode)", [_pct(r.train_accuracy) for r in runs]),
        ("ONNX accuracy (onnxruntime)", [_pct(r.onnx_accuracy) for r in runs]),
        (
            "ONNX parity (max |onnx - torch|)",
            [
                ("[green]✓[/green] " if r.onnx_passed else "[red]✗[/red] ") + f"{r.onnx_max_abs:.1g}"
                for r in runs
            ],
        ),
        ("fine-tuning time", [f"{r.seconds:.1f} s" for r in runs]),
    ]
    for label, cells in rows:
        table.add_row(label, *cells)
    out.print(table)
    bn, brn = result.runs.get("batchnorm"), result.runs.get("renorm")
    if bn is not None and brn is not None:
        gap = 100 * (brn.inference_accuracy - bn.inference_accuracy)
        out.print(
            f"renorm - batchnorm, inference accuracy: [bold]{gap:+.1f} points[/bold]"
            + ("  (--quick: too short to mean anything)" if quick else "")
        )
    out.print(f"files in {result.output}/: {', '.join(result.files)}")
    out.print(f"done in {result.seconds:.0f} s ({result.threads} thread{'s' if result.threads != 1 else ''})")


@app.command("reproduce")
def reproduce_cmd(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder for the runs and the report.")
    ] = Path("brn-reproduce"),
    settings: Annotated[
        str,
        typer.Option("--settings", help="Comma-separated: iid-32, micro-4, micro-2, grouped-2, grouped-16."),
    ] = "iid-32,micro-4,micro-2,grouped-2,grouped-16",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "0,1,2",
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps per run, from scratch.")] = 400,
    lr: Annotated[
        float, typer.Option("--lr", help="SGD learning rate (cosine decay), the same for all.")
    ] = 0.02,
    momentum: Annotated[
        float, typer.Option("--momentum", help="Rate of the moving mu/sigma (the paper's alpha).")
    ] = 0.01,
    device: DeviceOpt = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads (default 1).")] = 1,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Only rebuild results.json/.md/.png from finished runs.")
    ] = False,
    as_json: JsonOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Re-run runs that already finished.")] = False,
) -> None:
    """The paper's section-4 settings at small scale, batchnorm vs renorm over seeds: table and plot."""
    from .reproduce import ReproduceConfig, run_reproduce, write_report

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise BrnError(f"--seeds {seeds!r}: expected integers like 0,1,2") from None
    config = ReproduceConfig(
        output=str(output),
        settings=[s.strip() for s in settings.split(",") if s.strip()],
        seeds=seed_list,
        steps=steps,
        lr=lr,
        momentum=momentum,
        device=device,
        threads=threads,
        force=force,
    )
    if report_only:
        report = write_report(Path(output))
    else:

        def on_run(record: dict, done: int, total: int) -> None:
            if not as_json:
                out.print(
                    f"[{done}/{total}] {record['setting']:10s} {record['method']:9s} seed {record['seed']}: "
                    f"{_pct(record['val_accuracy'])} ({record['seconds']:.0f} s)"
                )

        report = run_reproduce(config, on_run=on_run, progress=not as_json)
    if as_json:
        print_json({k: v for k, v in report.items() if k != "table"})
        return
    out.print(report["table"])
    out.print(f"wrote {output}/results.json, results.md, results.png")


@app.command("bench")
def bench_cmd(
    what: Annotated[
        str, typer.Option("--what", help="Comma-separated: layer, models, onnx, peer (default: all).")
    ] = "layer,models,onnx,peer",
    device: DeviceOpt = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads (default 1).")] = 1,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer shapes and repetitions.")] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Also write the results as JSON.")
    ] = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Speed, side by side: renorm vs BatchNorm (layer sweep, ResNet training steps), ONNX folding, torchrl."""
    from .atomic import check_writable, write_atomic
    from .bench import run_benchmarks
    from .demo import set_threads
    from .evaluate import resolve_device

    parts = [w.strip() for w in what.split(",") if w.strip()]
    if output is not None:
        check_writable(output, force=force)
    dev = resolve_device(device)
    set_threads(threads)
    results = run_benchmarks(parts, device=dev, quick=quick, progress=None if as_json else err.print)
    if output is not None:
        write_atomic(
            output,
            lambda tmp: tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8"),
            force=force,
        )
    if as_json:
        print_json(results)
        return
    from .bench import benchmarks_markdown

    out.print(benchmarks_markdown(results))


# ----------------------------------------------------------------------------------------------
# sample-data
# ----------------------------------------------------------------------------------------------


@app.command("sample-data")
def sample_data_cmd(
    output: Annotated[Path, typer.Option("-o", "--output", help="The .npz file to write.")],
    force: ForceOpt = False,
) -> None:
    """Write the bundled sample data (5,000 real MNIST digits, uint8 N x 1 x 28 x 28) as an .npz to try the
    commands on: x_train, y_train (4,000) and x_val, y_val (1,000)."""
    import shutil

    from .atomic import check_writable, write_atomic
    from .samples import SAMPLE_DATA

    check_writable(output, force=force)
    write_atomic(output, lambda tmp: shutil.copyfile(SAMPLE_DATA, tmp), force=force)
    out.print(f"wrote {output} ({human_size(output.stat().st_size)}): 4,000 train and 1,000 val digits")


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


def main(argv: list[str] | None = None) -> None:
    """Console entry: runs the app and exits with one code for every way out of it.

    Usage errors: typer's usage message, exit 2. BrnError: one line `brn: error: ...`, its exit code. Ctrl-C:
    `brn: interrupted`, exit 130. Any other exception: one line naming it, exit 1. `--debug` (anywhere on the
    line) re-raises instead, for the traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        DEBUG["on"] = True
        args = [a for a in args if a != "--debug"]
    sys.exit(_run_app(args))


def _run_app(args: list[str]) -> int:
    try:
        # standalone_mode=False: typer raises usage errors and typer.Abort instead of printing and exiting,
        # and *returns* the code of a typer.Exit -- including the Exit(130) it makes of a KeyboardInterrupt.
        result = app(args=args, prog_name="brn", standalone_mode=False)
    except KeyboardInterrupt:  # one that arrives outside typer's own handling
        return _interrupted()
    except typer.Abort as exc:
        if isinstance(exc.__cause__, EOFError):
            # typer reads EOFError as end of input at a prompt; brn has no prompts, so a file ended early.
            return _unexpected(exc.__cause__)
        return _interrupted()
    except typer.TyperException as exc:  # usage errors: typer's own message (usage line, hint, "Error: ...")
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            sys.stderr.write(f"Error: {exc.format_message()}\n")
        return exc.exit_code
    except BrnError as exc:
        if DEBUG["on"]:
            raise
        sys.stderr.write(f"brn: error: {exc}\n")
        return exc.exit_code
    except Exception as exc:
        return _unexpected(exc)
    if isinstance(result, int) and not isinstance(result, bool):  # the code of a typer.Exit
        return _interrupted() if result == INTERRUPTED else result
    return 0  # the commands return None


def _interrupted() -> int:
    sys.stderr.write("brn: interrupted\n")
    return INTERRUPTED


def _unexpected(exc: BaseException) -> int:
    if DEBUG["on"]:
        raise exc
    sys.stderr.write(
        f"brn: error: {type(exc).__name__}: {first_line(exc)} (run with --debug for the traceback)\n"
    )
    return 1
