"""`brn evaluate` and `brn calibrate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    from brn_cli.data.samplers import parse_sampler
    from brn_cli.evaluation.evaluate import evaluate_data

    sampler = parse_sampler(sampler)
    dev, ckpt, bundle, _ = _load_for_data(
        "evaluate",
        checkpoint,
        data,
        device=device,
        val_split=val_split,
        normalize=normalize,
        image_size=image_size,
        resize_size=resize_size,
        channels=channels,
        seed=seed,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_pickle=trust_pickle,
        key=key,
    )
    result = evaluate_data(
        ckpt.model,
        bundle,
        batch_size=batch_size,
        batch_stats=batch_stats,
        sampler=sampler,
        seed=seed,
        device=dev,
        progress=progress_if(not as_json),
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
):
    """(device, checkpoint, data bundle, preprocessing options) for a command that runs a checkpoint on data.

    The data is prepared as the options say, else as the checkpoint records it was fine-tuned; each setting
    taken from the checkpoint is said on stderr, with the flag that changes it.
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
    bundle = load_data(data, val_split=val_split, seed=seed, channels=channels, **preprocessing)
    return dev, ckpt, bundle, preprocessing


def _print_evaluation(checkpoint: Path, data: str, result: dict) -> None:
    out.print(f"[bold]{checkpoint}[/bold]  on {data}")
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
    from brn_cli.evaluation.calibrate import calibrate_data
    from brn_cli.storage.atomic import check_writable

    check_writable(output, force=force)
    dev, ckpt, bundle, preprocessing = _load_for_data(
        "calibrate",
        checkpoint,
        data,
        device=device,
        val_split=val_split,
        normalize=normalize,
        image_size=image_size,
        resize_size=resize_size,
        channels=channels,
        seed=seed,
        arch=arch,
        arch_kwargs=arch_kwargs,
        trust_pickle=trust_pickle,
        key=key,
    )
    shifts, used = calibrate_data(
        ckpt.model,
        bundle,
        num_batches=batches,
        batch_size=batch_size,
        split=split,
        seed=seed,
        device=dev,
        progress=progress_if(not as_json),
    )
    _save_calibrated(ckpt, output, preprocessing, force=force)
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


def _save_calibrated(ckpt, output: Path, preprocessing: dict, *, force: bool) -> None:
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
        **{**ckpt.lineage(), "preprocessing": preprocessing_record(**preprocessing)},
    )


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
