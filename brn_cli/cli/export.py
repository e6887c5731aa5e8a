"""`brn export onnx` and `brn export state-dict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from brn_cli.cli.app import err, export_app, out, with_flags
from brn_cli.cli.options import (
    ArchKwargsOpt,
    ArchOpt,
    CheckpointArg,
    ForceOpt,
    InputShapeOpt,
    JsonOpt,
    KeyOpt,
    NormalizeOpt,
    TrustPickleOpt,
    human_size,
    load,
    parse_shape,
    print_json,
)
from brn_cli.cli.progress import RichProgress, stage_counter
from brn_cli.errors import BrnError


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
    if report.dynamic_note:
        out.print(f"[yellow]{report.dynamic_note}[/yellow]")
    if report.verify is not None:
        _print_verification(report.verify)
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


def _print_verification(v) -> None:
    """One line per check, then per output tensor its worst comparison over every check."""
    shapes = ", ".join(str(s) for s in v.input_shapes)
    out.print(
        f"verification against the PyTorch eval model on {v.inputs}, shapes {shapes} "
        f"(pass: max|onnx - torch| <= atol {v.atol:g} + rtol {v.rtol:g} x scale, scale = max|torch| per output):",
        markup=False,
        highlight=False,
    )
    for c in v.checks:
        mark = "[green]✓[/green]" if c.passed else "[red]✗[/red]"
        top1 = f", top-1 agreement {c.top1:.0%}" if c.top1 is not None else ""
        cause = f": [red]{escape(c.error or c.mismatch)}[/red]" if (c.error or c.mismatch) else ""
        out.print(
            f"  {mark} {c.provider}, ORT optimizations {c.optimization}, input {c.input_shape} ({c.inputs} inputs)"
            + (cause or f": max abs {c.max_abs:.3g}, max rel {c.max_rel:.3g}{top1}")
        )
        if c.detections is not None:  # a detector: what the detection-by-detection comparison paired
            out.print(f"    {c.detections.line()}", markup=False, highlight=False)
    worst: dict[str, object] = {}
    for c in v.checks:
        for o in c.outputs:
            seen = worst.get(o.name)
            if seen is None or (
                seen.passed and (not o.passed or o.max_abs / o.tolerance > seen.max_abs / seen.tolerance)
            ):
                worst[o.name] = o
    if not worst:
        return
    table = Table(title="per output, worst over the checks")
    for col in ("output", "shape", "max abs diff", "scale", "tolerance", ""):
        table.add_column(col, justify="left" if col in ("output", "shape") else "right")
    for o in worst.values():
        mark = "[green]✓[/green]" if o.passed else "[red]✗[/red]"
        table.add_row(
            escape(o.name), str(o.shape), f"{o.max_abs:.3g}", f"{o.scale:.3g}", f"{o.tolerance:.3g}", mark
        )
    out.print(table)


DynamicShapeOpt = Annotated[
    str,
    typer.Option(
        "--dynamic-shape",
        help="Input axes left open in the graph: auto (spatial for a dense model that runs at a second size, "
        "else batch), batch, spatial (batch and H, W / D, H, W; verified at two sizes), none.",
    ),
]
VerifyDataOpt = Annotated[
    str | None,
    typer.Option(
        "--verify-data",
        help="Verify on real examples of this data (.npz, folder, package.module:callable), prepared as the "
        "checkpoint records, or 'random' for random normal inputs (default: the data a fine-tuned checkpoint "
        "records, else random).",
    ),
]


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
    dynamic_shape: DynamicShapeOpt = "auto",
    verify_data: VerifyDataOpt = None,
    normalize: NormalizeOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold norms into their producers, export one ONNX file and verify it with onnxruntime."""
    from brn_cli.deploy.export import DYNAMIC_SHAPES, EXPORTERS, OnnxVerificationError, export_onnx_checked
    from brn_cli.nn.convert import infer_input_shape
    from brn_cli.storage.atomic import check_writable

    if exporter not in EXPORTERS:
        raise BrnError(f"--exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if dynamic_shape not in DYNAMIC_SHAPES:
        raise BrnError(f"--dynamic-shape {dynamic_shape!r}: choose one of {', '.join(DYNAMIC_SHAPES)}")
    check_writable(output, force=force)
    ckpt = load(checkpoint, arch, arch_kwargs, trust_pickle, key)
    examples, examples_from = (None, None) if no_verify else _verify_examples(ckpt, verify_data, normalize)
    shape = (
        parse_shape(input_shape)
        or ckpt.input_shape
        or ([2, *examples.shape[1:]] if examples is not None else None)
        or infer_input_shape(ckpt.model, arch_spec=ckpt.arch_spec)
    )
    if shape is None:
        raise BrnError("cannot infer an input shape; pass --input-shape, e.g. 2,3,224,224")
    stages = 2 + (not no_fold) + (not no_verify) + benchmark
    failed = None
    progress = RichProgress(spinner=True, elapsed=True, console=err)
    progress.start("export", stages)
    try:
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
            step=stage_counter(progress),
            dynamic_shape=dynamic_shape,
            verify_data=examples,
            verify_data_from=examples_from,
        )
    except OnnxVerificationError as exc:  # the checks are printed before the one-line error
        failed, report = exc, exc.report
    finally:
        progress.stop()
    _print_onnx_report(report, as_json)
    if failed is not None:
        raise failed
    if not as_json:
        _print_onnx_written(report, output)


def _print_onnx_report(report, as_json: bool) -> None:
    if as_json:
        print_json(report.to_dict())
    else:
        _print_export_report(report)


def _verify_examples(ckpt, spec: str | None, normalize: str | None):
    """(examples, what they are) to verify on: of the data named, else of the data a fine-tuned checkpoint
    records (said on stderr), else (None, None) for random normal inputs."""
    from brn_cli.data.specs import preprocessing_for
    from brn_cli.deploy.verify import data_examples, recorded_data

    if spec is not None and spec.strip().lower() == "random":
        return None, None
    options: dict = {"spec": spec}
    if spec is None:
        recorded, found = recorded_data(ckpt.training, ckpt.path.name)
        if recorded is None:
            return None, None
        options = recorded
        err.print(
            f"note: verifying on examples of {found} (--verify-data to change, 'random' for random inputs)"
        )
    preprocessing, notes = preprocessing_for(ckpt.preprocessing, options["spec"], normalize=normalize)
    for param, taken in notes:
        flag = with_flags(f"`{param}`", ["export", "onnx"])
        err.print(f"note: {taken}, as recorded in {ckpt.path.name} ({flag} to change)")
    return data_examples(ckpt.model, preprocessing=preprocessing, **options)


_AXES = {"spatial": "batch and spatial axes dynamic", "batch": "batch dynamic", "none": "fixed shape"}


def _print_onnx_written(report, output: Path) -> None:
    axes = "one input per image" if report.image_list else _AXES[report.dynamic_shape]
    out.print(
        f"wrote {output} ({human_size(report.size_bytes)}"
        f"{', weights in ' + output.name + '.data' if report.external_data else ''}) "
        f"in {report.export_seconds:.2f} s export ({report.exporter} exporter, opset {report.opset}, "
        f"input {report.input_shape}, {axes}"
        f"{', fp16' if report.fp16 else ''})"
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
    from brn_cli.errors import VerificationError
    from brn_cli.nn.convert import infer_input_shape
    from brn_cli.storage.atomic import check_writable
    from brn_cli.storage.checkpoint import build_arch
    from brn_cli.storage.statedict import (
        FORMATS,
        check_state_dict_roundtrip,
        export_state_dict,
        plain_state_dict,
    )

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
    else:
        _print_state_dict_written(result)


def _print_state_dict_written(result: dict) -> None:
    check = result["roundtrip"]
    if check is None:
        out.print(
            "[yellow]no architecture recorded: strict-load check skipped (pass --arch to run it)[/yellow]"
        )
    else:
        diff = check["max_abs_diff"]
        out.print(
            f"[green]✓[/green] loads with strict=True into {result['arch']}"
            + (f"; eval outputs max |diff| = {diff:.3g}" if diff is not None else "")
        )
    out.print(
        f"wrote {result['output']} ({result['format']}, {result['tensors']} tensors, "
        f"{human_size(result['size_bytes'])})"
    )
