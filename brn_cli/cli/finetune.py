"""`brn finetune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from brn_cli.cli.app import ChannelsOpt, app, out
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
from brn_cli.errors import BrnError


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
    from brn_cli.train.finetune import FinetuneConfig, run_finetune

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
    from brn_cli.storage.checkpoint import parse_arch_kwargs

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

    from brn_cli.train.distributed import launched_by_torchrun
    from brn_cli.train.launch import launch_finetune

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
