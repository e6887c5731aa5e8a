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
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="classification (the whole flow) or segmentation (a small UNet on the digits' pixel "
            "classes, batchnorm vs renorm at batch 2).",
        ),
    ] = "classification",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """The whole flow on the bundled digits: inspect, convert, fine-tune batchnorm vs renorm, evaluate, export."""
    from rich.rule import Rule

    from brn_cli.recipes.demo import DemoConfig, run_demo
    from brn_cli.recipes.demo_seg import SegDemoConfig, run_seg_demo

    if task not in ("classification", "segmentation"):
        raise BrnError(f"--task {task!r}: the demo runs classification or segmentation")
    seg = task == "segmentation"
    kind, runner = (SegDemoConfig, run_seg_demo) if seg else (DemoConfig, run_demo)
    base = kind.quick() if quick else kind()
    overrides = {"steps": steps, "pretrain_steps": pretrain_steps, "sampler": sampler}
    config = kind(
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

    result = runner(config, stage=stage, note=note, progress=progress_if(not quiet, transient=False))
    if as_json:
        print_json(result.to_dict())
        return
    (_print_seg_demo_result if seg else _print_demo_result)(result, config, quick=quick)


def _print_seg_demo_result(result, config, *, quick: bool) -> None:
    """The segmentation demo's closing table: both runs' mean IoU and pixel accuracy, two ways."""
    table = Table(
        title=f"fine-tuned {config.steps} steps at batch {config.batch_size} on {config.sampler} batches"
    )
    table.add_column("")
    for method in result.runs:
        table.add_column(method, justify="right")
    runs = list(result.runs.values())
    rows = [
        ("schedule", [r["schedule"] for r in runs]),
        ("mean IoU, inference mode", [f"[bold]{_pct(r['inference_mean_iou'])}[/bold]" for r in runs]),
        ("pixel accuracy, inference mode", [_pct(r["inference_pixel_accuracy"]) for r in runs]),
        (f"mean IoU, batch statistics ({config.sampler})", [_pct(r["batch_stats_mean_iou"]) for r in runs]),
        ("fine-tuning time", [f"{r['seconds']:.1f} s" for r in runs]),
    ]
    for label, cells in rows:
        table.add_row(label, *cells)
    out.print(table)
    gap = 100 * (result.runs["renorm"]["inference_mean_iou"] - result.runs["batchnorm"]["inference_mean_iou"])
    note = "  (--quick: too short to mean anything)" if quick else ""
    out.print(f"renorm - batchnorm, mean IoU in inference mode: [bold]{gap:+.1f} points[/bold]{note}")
    out.print(f"done in {result.seconds:.0f} s; files in {result.output}/")


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
    quick: Annotated[
        bool, typer.Option("--quick", help="A handful of cells of 12 steps (seconds; too short to compare).")
    ] = False,
    cells: Annotated[
        str,
        typer.Option("--cells", help="Only cells whose name contains one of these (comma-separated)."),
    ] = "",
    seeds: Annotated[
        str, typer.Option("--seeds", help="Comma-separated seeds (default 0,1,2; --quick: 0,1).")
    ] = "",
    lr: Annotated[float, typer.Option("--lr", help="Peak SGD learning rate, the same for all.")] = 0.02,
    jobs: Annotated[int, typer.Option("--jobs", help="Worker processes running runs in parallel.")] = 1,
    device: DeviceOpt = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads per run (default 1).")] = 1,
    plan_only: Annotated[
        bool, typer.Option("--plan", help="List the cells and count the runs (done / to do); run nothing.")
    ] = False,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Only rebuild the report from finished runs.")
    ] = False,
    as_json: JsonOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Re-run runs that already finished.")] = False,
) -> None:
    """Where renorm helps: batchnorm, renorm, GroupNorm, precise BN and batch statistics over the grid."""
    from brn_cli.recipes.reproduce import ReproduceConfig, plan_summary, run_reproduce, write_grid_report

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise BrnError(f"--seeds {seeds!r}: expected integers like 0,1,2") from None
    config = ReproduceConfig(
        output=str(output),
        quick=quick,
        cells=[c.strip() for c in cells.split(",") if c.strip()],
        seeds=seed_list or None,
        lr=lr,
        jobs=jobs,
        device=device,
        threads=threads,
        force=force,
        command=_reproduce_command(output, quick, cells, seeds, lr, jobs, device, threads),
    )
    if plan_only:
        summary = plan_summary(config)
        if as_json:
            print_json(summary)
            return
        for line in summary["lines"]:
            out.print(line, markup=False)
        return
    if report_only:
        report = write_grid_report(Path(output))
    else:

        def on_run(record: dict, done: int, total: int) -> None:
            if not as_json:
                result = record.get("failed") or _pct(record.get("val_accuracy"))
                out.print(
                    f"[{done}/{total}] {record['key']} {record['method']} seed {record['seed']}: "
                    f"{result} ({record['seconds']:.0f} s)",
                    markup=False,
                )

        report = run_reproduce(
            config, on_run=on_run, progress=progress_if(not as_json, transient=False, elapsed=True)
        )
    if as_json:
        print_json({k: v for k, v in report.items() if k != "table"})
        return
    out.print(f"wrote {output}/results.md, results.json and curves/ ({len(report['rows'])} cells)")


def _reproduce_command(output, quick, cells, seeds, lr, jobs, device, threads) -> str:
    """The reproduce command line that makes this grid (options at their defaults left out), for the report."""
    parts = ["brn reproduce", f"-o {output}", "--quick" if quick else ""]
    parts += [f"--cells {cells}" if cells else "", f"--seeds {seeds}" if seeds else ""]
    parts += [f"--lr {lr:g}" if lr != 0.02 else "", f"--jobs {jobs}" if jobs != 1 else ""]
    parts += [f"--device {device}" if device != "cpu" else "", f"--threads {threads}" if threads != 1 else ""]
    return " ".join(p for p in parts if p)


@app.command("bench")
def bench_cmd(
    what: Annotated[
        str,
        typer.Option(
            "--what",
            help="Comma-separated: layer, models, onnx, peer, ops, crossq, compiled (default: all).",
        ),
    ] = "layer,models,onnx,peer,ops,crossq,compiled",
    device: DeviceOpt = "cpu",
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads (default 1).")] = 1,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer shapes and repetitions.")] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Also write the results as JSON.")
    ] = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Speed, side by side: renorm vs BatchNorm (layer sweep, ResNet and CrossQ critic training steps, eager
    and under torch.compile), ONNX folding, torchrl."""
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
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            help="The .npz file to write (an existing folder: digits.npz / digits-seg.npz in it).",
        ),
    ],
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="classification (labels; embedding uses the same) or segmentation (y holds masks: each ink "
            "pixel is its digit + 1, background 0).",
        ),
    ] = "classification",
    force: ForceOpt = False,
) -> None:
    """Write the bundled sample data (5,000 real MNIST digits, uint8 N x 1 x 28 x 28) as an .npz to try the
    commands on: x_train, y_train (4,000) and x_val, y_val (1,000)."""
    from brn_cli.recipes.demo_seg import write_sample_data

    path = write_sample_data(output, task, force=force)
    what = "digits with their masks" if task == "segmentation" else "digits"
    out.print(f"wrote {path} ({human_size(path.stat().st_size)}): 4,000 train and 1,000 val {what}")
