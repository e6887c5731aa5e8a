"""`brn demo`, `brn reproduce` and `brn bench`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from brn_cli.cli.app import app, err, out
from brn_cli.cli.options import (
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    SeedOpt,
    ThreadsOpt,
    _pct,
    human_size,
    print_json,
)
from brn_cli.cli.progress import progress_if
from brn_cli.errors import BrnError


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

    from brn_cli.recipes.demo import DemoConfig, run_demo

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

    result = run_demo(config, stage=stage, note=note, progress=progress_if(not quiet, transient=False))
    if as_json:
        print_json(result.to_dict())
        return
    _print_demo_result(result, config, quick=quick)


def _print_demo_result(result, config, *, quick: bool) -> None:
    """The demo's closing table: both runs' accuracies (PyTorch and ONNX), parity and time."""
    from rich.rule import Rule

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
    from brn_cli.recipes.reproduce import ReproduceConfig, run_reproduce, write_report

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

        report = run_reproduce(
            config, on_run=on_run, progress=progress_if(not as_json, transient=False, elapsed=True)
        )
    if as_json:
        print_json({k: v for k, v in report.items() if k != "table"})
        return
    out.print(report["table"])
    out.print(f"wrote {output}/results.json, results.md, results.png")


@app.command("bench")
def bench_cmd(
    what: Annotated[
        str, typer.Option("--what", help="Comma-separated: layer, models, onnx, peer, ops (default: all).")
    ] = "layer,models,onnx,peer,ops",
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
    from brn_cli.nn.device import resolve_device, set_threads
    from brn_cli.recipes.bench import run_benchmarks
    from brn_cli.storage.atomic import check_writable, write_atomic

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
    from brn_cli.recipes.bench import benchmarks_markdown

    out.print(benchmarks_markdown(results))


@app.command("sample-data")
def sample_data_cmd(
    output: Annotated[Path, typer.Option("-o", "--output", help="The .npz file to write.")],
    force: ForceOpt = False,
) -> None:
    """Write the bundled sample data (5,000 real MNIST digits, uint8 N x 1 x 28 x 28) as an .npz to try the
    commands on: x_train, y_train (4,000) and x_val, y_val (1,000)."""
    import shutil

    from brn_cli.samples import SAMPLE_DATA
    from brn_cli.storage.atomic import check_writable, write_atomic

    check_writable(output, force=force)
    write_atomic(output, lambda tmp: shutil.copyfile(SAMPLE_DATA, tmp), force=force)
    out.print(f"wrote {output} ({human_size(output.stat().st_size)}): 4,000 train and 1,000 val digits")
