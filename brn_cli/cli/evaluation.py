"""`brn evaluate` and `brn calibrate`."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from brn_cli.cli.app import ChannelsOpt, app, err, out, with_flags
from brn_cli.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    CheckpointArg,
    DataOpt,
    DeviceOpt,
    ForceOpt,
    ImageSizeOpt,
    JsonOpt,
    KeyOpt,
    NormalizeOpt,
    ResizeSizeOpt,
    SeedOpt,
    TrustPickleOpt,
    ValSplitOpt,
    load,
    print_json,
    print_wrote_checkpoint,
)
from brn_cli.cli.progress import progress_if

# The task options of evaluate and calibrate (finetune's come from its config). None: as the checkpoint
# records (finetune writes its task into the checkpoint), else classification.
TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task",
        help="classification, segmentation (class-map masks) or embedding (recall@k); default: the task the "
        "checkpoint was fine-tuned for, else classification.",
    ),
]
IgnoreIndexOpt = Annotated[
    int | None,
    typer.Option("--ignore-index", help="Segmentation: the mask value of unlabelled pixels (default 255)."),
]
# The options of both commands that say how the checkpoint loads and the data is prepared (the keywords of
# _load_for_data, and the task's ignore index), with their defaults, in the order --help lists them.
_DATA_OPTIONS: dict[str, tuple[Any, Any]] = {
    "device": (DeviceOpt, "auto"),
    "val_split": (ValSplitOpt, None),
    "normalize": (NormalizeOpt, None),
    "image_size": (ImageSizeOpt, None),
    "resize_size": (ResizeSizeOpt, None),
    "channels": (ChannelsOpt, None),
    "seed": (SeedOpt, 0),
    "arch": (ArchOpt, None),
    "arch_kwargs": (ArchKwargsOpt, None),
    "trust_pickle": (TrustPickleOpt, False),
    "key": (KeyOpt, None),
    "task": (TaskOpt, None),
    "ignore_index": (IgnoreIndexOpt, None),
}


def _with_data_options(after: str):
    """Give a command (its own options, then ``**options``) the options of :data:`_DATA_OPTIONS` too, listed
    after its own option `after`; typer reads the signature built here and passes them in ``options``."""

    def decorate(command):
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            p.replace(annotation=hints[p.name])
            for p in inspect.signature(command).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        at = [p.name for p in own].index(after) + 1
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        shared = [inspect.Parameter(n, kind, default=d, annotation=a) for n, (a, d) in _DATA_OPTIONS.items()]
        signature = inspect.Signature(own[:at] + shared + own[at:])
        command.__signature__ = signature
        command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return command

    return decorate


@app.command("evaluate")
@_with_data_options(after="sampler")
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
    loss: Annotated[
        str | None, typer.Option("--loss", help="package.module:callable(output, target) -> scalar tensor.")
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option("--metric", help="package.module:callable(output, target) -> number or dict."),
    ] = None,
    embedding_loss: Annotated[
        str | None,
        typer.Option("--embedding-loss", help="Embedding: triplet or contrastive (the loss shown)."),
    ] = None,
    margin: Annotated[float | None, typer.Option("--margin", help="Embedding loss margin.")] = None,
    recall_k: Annotated[
        str | None, typer.Option("--recall-k", help="Embedding: the k of recall@k (default 1,5).")
    ] = None,
    as_json: JsonOpt = False,
    **options: Any,
) -> None:
    """The task's loss and metrics on the validation split, inference mode (and with --batch-stats,
    minibatch statistics: the train/inference gap in the task's own metric)."""
    from brn_cli.data.samplers import parse_sampler
    from brn_cli.evaluation.evaluate import evaluate_data
    from brn_cli.tasks import make_task

    sampler = parse_sampler(sampler)
    given = {"embedding_loss": embedding_loss, "margin": margin, "recall_k": recall_k}
    task_given = {"ignore_index": options.pop("ignore_index"), **given}
    dev, ckpt, bundle, _, task_options = _load_for_data(
        "evaluate", checkpoint, data, task_given=task_given, **options
    )
    result = evaluate_data(
        ckpt.model,
        bundle,
        batch_size=batch_size,
        batch_stats=batch_stats,
        sampler=sampler,
        seed=options["seed"],
        device=dev,
        progress=progress_if(not as_json),
        task=make_task(**task_options, loss=loss, metric=metric),
    )
    result.update(checkpoint=str(checkpoint), data=bundle.description, device=str(dev))
    if as_json:
        print_json(result)
    else:
        _print_evaluation(checkpoint, bundle.description, result)


def _load_for_data(
    command: str,
    checkpoint: Path,
    data: str,
    *,
    device: str,
    val_split: float | None,
    normalize: str | None,
    image_size: int | None,
    resize_size: int | None,
    channels: int | None,
    seed: int,
    arch: str | None,
    arch_kwargs: str | None,
    trust_pickle: bool,
    key: str | None,
    task: str | None,
    task_given: dict,
    inputs_only: bool = False,
):
    """(device, checkpoint, data bundle, preprocessing options, task options) for a command that runs a
    checkpoint on data.

    The data is prepared as the options say, else as the checkpoint records it was fine-tuned; each setting
    taken from the checkpoint is said on stderr, with the flag that changes it. So is the task (its name and
    plain options, :func:`brn_cli.tasks.make_task`'s keywords); the data is loaded for it (masks for
    segmentation), or with `inputs_only` its inputs alone, whatever the targets hold.
    """
    from brn_cli.data.datasets import load_data
    from brn_cli.data.specs import preprocessing_for
    from brn_cli.nn.device import resolve_device

    dev = resolve_device(device)
    ckpt = load(checkpoint, arch, arch_kwargs, trust_pickle, key)
    preprocessing, notes = preprocessing_for(
        ckpt.preprocessing, data, normalize=normalize, image_size=image_size, resize_size=resize_size
    )
    for param, taken in notes:
        flag = with_flags(f"`{param}`", [command])
        err.print(f"note: {taken}, as recorded in {ckpt.path.name} ({flag} to change)")
    task_options = _task_options(command, ckpt, task, task_given)
    data_task = {} if task_options["name"] == "classification" else {"task": task_options["name"]}
    if data_task and "ignore_index" in task_options:
        data_task["ignore_index"] = task_options["ignore_index"]
    if inputs_only:
        data_task = {"inputs_only": True}
    bundle = load_data(data, val_split=val_split, seed=seed, channels=channels, **preprocessing, **data_task)
    return dev, ckpt, bundle, preprocessing, task_options


def _task_options(command: str, ckpt, task: str | None, given: dict) -> dict:
    """The task's options: those given, else the checkpoint's recorded task (said on stderr), else
    classification."""
    from brn_cli.tasks import task_from_record

    recorded = task_from_record(ckpt.task)
    if task is None and recorded.get("name", "classification") != "classification":
        err.print(f"note: task {recorded['name']}, as recorded in {ckpt.path.name} (--task to change)")
    if task is not None and task != recorded.get("name"):
        recorded = {}  # another task's options do not apply
    chosen = {k: v for k, v in given.items() if v is not None}
    return {"name": task or recorded.get("name", "classification"), **{**recorded, **chosen}}


def _metric_columns(result: dict) -> list[str]:
    """The scalar metrics of the report, the task's primary one first."""
    names = [k for k, v in (result["inference"]["metrics"] or {}).items() if isinstance(v, (int, float))]
    primary = result.get("metric", "accuracy")
    return [primary] + [n for n in names if n != primary]


def _print_evaluation(checkpoint: Path, data: str, result: dict) -> None:
    out.print(f"[bold]{checkpoint}[/bold]  on {data}")
    table = Table()
    columns = _metric_columns(result)
    for col in ("mode", "batches", "examples", "loss", *columns):
        table.add_column(col, justify="right" if col != "mode" else "left")
    rows = [("inference (moving averages)", result["inference"])]
    bs = result["batch_stats"]
    if bs is not None:
        rows.append((f"minibatch statistics ({bs['sampler']}, batch {bs['batch_size']})", bs))
    for label, row in rows:
        values = [f"{100 * row['metrics'][c]:.2f}%" for c in columns]
        table.add_row(label, str(row["batches"]), str(row["examples"]), f"{row['loss']:.4f}", *values)
    out.print(table)
    per_class = result["inference"]["metrics"].get("iou_per_class")
    if per_class:
        shown = ", ".join(f"{c}: {'-' if v is None else f'{100 * v:.1f}%'}" for c, v in enumerate(per_class))
        out.print(f"IoU per class (inference): {shown}")
    if bs is not None:
        out.print(
            f"train/inference gap: minibatch-stats minus inference {columns[0]} = "
            f"{100 * result['gap']:+.2f} points"
        )


@app.command("calibrate")
@_with_data_options(after="split")
def calibrate_cmd(
    checkpoint: CheckpointArg,
    data: DataOpt,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output brn checkpoint.")],
    batches: Annotated[int, typer.Option("--batches", help="Batches to average over (exactly).")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per batch.")] = 64,
    split: Annotated[str, typer.Option("--split", help="train or val.")] = "train",
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    **options: Any,
) -> None:
    """Re-estimate every norm layer's mu and sigma exactly over N batches; write a new brn checkpoint."""
    from brn_cli.evaluation.calibrate import calibrate_data
    from brn_cli.storage.atomic import check_writable

    check_writable(output, force=force)
    # The task is recorded in the new checkpoint; calibration reads the inputs only, whatever the task.
    task_given = {"ignore_index": options.pop("ignore_index")}
    dev, ckpt, bundle, preprocessing, task_options = _load_for_data(
        "calibrate", checkpoint, data, task_given=task_given, inputs_only=True, **options
    )
    shifts, used = calibrate_data(
        ckpt.model,
        bundle,
        num_batches=batches,
        batch_size=batch_size,
        split=split,
        seed=options["seed"],
        device=dev,
        progress=progress_if(not as_json),
    )
    _save_calibrated(ckpt, output, preprocessing, task_options, force=force)
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
    _print_calibration(shifts, result)
    print_wrote_checkpoint(output, ckpt.arch_spec)


def _save_calibrated(ckpt, output: Path, preprocessing: dict, task_options: dict, *, force: bool) -> None:
    from brn_cli.data.specs import preprocessing_record
    from brn_cli.nn.convert import infer_input_shape
    from brn_cli.storage.checkpoint import save_brn_checkpoint

    model = ckpt.model.cpu()
    save_brn_checkpoint(
        model,
        output,
        force=force,
        input_shape=ckpt.input_shape or infer_input_shape(model, arch_spec=ckpt.arch_spec),
        command="calibrate",
        # The statistics were measured on inputs prepared this way: the new checkpoint records that.
        **{
            **ckpt.lineage(),
            "preprocessing": preprocessing_record(**preprocessing),
            "task": _task_record(task_options),
        },
    )


def _task_record(task_options: dict) -> dict | None:
    """What the calibrated checkpoint records of its task (none for plain classification)."""
    if task_options["name"] == "classification":
        return None
    from brn_cli.tasks import make_task

    return make_task(**task_options).settings()


def _print_calibration(shifts, result: dict) -> None:
    table = Table()
    for col in ("layer", "C", "max |mu shift|", "sigma new/old (min..max)"):
        table.add_column(col)
    for s in shifts:
        table.add_row(
            s.name, str(s.channels), f"{s.mean_shift:.4g}", f"{s.min_sigma_ratio:.4f}..{s.sigma_ratio:.4f}"
        )
    out.print(table)
    used, size = result["batches"], result["batch_size"]
    short = used < result["batches_requested"]
    note = f" (only {used} full batches of {size} in the {result['split']} split)" if short else ""
    out.print(f"calibrated {len(shifts)} layers over {used} batches x {size} examples{note}")
