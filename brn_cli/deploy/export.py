"""ONNX export of a (folded) model, with verification as a separate step (see :mod:`brn_cli.deploy.verify`).

Pipeline of :func:`export_onnx_checked` (what ``brn export onnx`` runs):

1. eval mode; one forward on the example input checks the input shape; the dynamic axes are decided
   (``dynamic_shape``: spatial axes only where the model runs at a second size);
2. :func:`brn_cli.deploy.fold.fold_model` on a copy (skipped with ``fold=False``), then ``.half()`` for fp16 --
   after folding, so the folding arithmetic stays float64;
3. :func:`export_onnx` into a temporary file beside the output (past 2 GB: an .onnx and its external
   ``.data`` together in a private folder beside the output), batch axis dynamic (the example batch is
   at least 2 so the exporter cannot specialise it to 1), spatial axes too when so decided;
4. op counts read back with the ``onnx`` package; a BatchNormalization node in training mode is an error;
5. :func:`brn_cli.deploy.verify.verify_onnx` on the temporary file against the ORIGINAL unfolded eval model,
   at two batch sizes and, with dynamic spatial axes, two sizes, on random or the caller's real inputs;
6. only when verification passes (or is switched off) is the file (with its ``.data``) renamed onto the
   output path. A failed verification removes it and raises OnnxVerificationError: nothing partial is ever
   left where the user expects output, and a previous export stays as it was until the new one has passed.

Exporter: the TorchScript-based exporter (``dynamo=False``) is the default. On torch 2.14 it is still
present, produces the same graph after folding, and exports a ResNet-18 in ~0.4 s against ~4 s for the
dynamo exporter (see docs/export.md). ``exporter="dynamo"`` selects torch.export + onnxscript.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brn_cli.deploy.fold import FoldResult, fold_model
from brn_cli.deploy.graph import TraceError
from brn_cli.deploy.verify import BenchmarkResult, VerifyReport, benchmark_onnx, check_examples, verify_onnx
from brn_cli.errors import BrnError, VerificationError, first_line
from brn_cli.nn.outputs import flat_outputs
from brn_cli.storage.atomic import atomic_path, check_writable, remove_stale_temps, temp_dir

__all__ = [
    "DEFAULT_OPSET",
    "DYNAMIC_SHAPES",
    "EXPORTERS",
    "OnnxExportReport",
    "OnnxVerificationError",
    "default_tolerances",
    "export_onnx",
    "export_onnx_checked",
    "onnx_op_counts",
    "takes_image_list",
]

DEFAULT_OPSET = 18
EXPORTERS = ("legacy", "dynamo")
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's hard limit for one file
STAGING_SUFFIX = ".export"  # .NAME.PID.XXXXXXXX.export: where an .onnx and its .data wait for verification


def default_tolerances(fp16: bool) -> tuple[float, float]:
    """(atol, rtol) used when the user gives none (rtol is relative to each output's largest magnitude).

    fp32 export errors measure ~1e-6 of the output scale, a folding mistake ~1; fp16 keeps ~3 decimal digits
    per op and measured up to 3e-3 of the scale on zoo models, hence 1e-2.
    """
    return (1e-2, 1e-2) if fp16 else (1e-4, 1e-4)


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | list[torch.Tensor],
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    exporter: str = "legacy",
    keep_batchnorm: bool = False,
    external_data: bool = False,
) -> float:
    """Export `model` (already in the form to ship: eval mode, folded or not) to `path`; returns seconds.

    `dynamic_batch` makes axis 0 of the input and outputs symbolic; `dynamic_spatial` also the axes after the
    channels (``length``; ``height, width``; ``depth, height, width``) of the input and of every output with as
    many axes as the input. `keep_batchnorm=True` stops the exporter from fusing Conv+BatchNormalization itself
    (both exporters do by default), so that an unfolded export really contains its BatchNormalization nodes.
    `external_data` stores weights in a side file (needed past 2 GB). A list `example_input` (a torchvision
    detector's images) becomes one graph input per image, ``image_0, image_1, ...``, of fixed shape: the
    detector's forward loops over the list, so the number of images is part of the graph; the first axis of
    every output (the number of detections) stays dynamic. Outputs are named ``output`` (one tensor), by their
    keys (a dict of tensors, e.g. ``out`` and ``aux``), else ``output_0, output_1, ...``.
    """
    if exporter not in EXPORTERS:
        raise BrnError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    model.eval()
    with torch.no_grad():
        outputs = model(example_input)
    output_names = _output_names(outputs)
    ndims = [t.ndim for t in flat_outputs(outputs)]
    image_list = isinstance(example_input, list)
    input_names = [f"image_{i}" for i in range(len(example_input))] if image_list else ["input"]
    if image_list:
        dynamic_batch = dynamic_spatial = False
    spatial = _spatial_axis_names(example_input.ndim) if dynamic_spatial and not image_list else {}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer warnings
        if exporter == "legacy":
            axes = _legacy_dynamic_axes(output_names, ndims, dynamic_batch, spatial, image_list)
            torch.onnx.export(
                model,
                (example_input,),
                str(path),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                opset_version=opset,
                training=torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL,
            )
        else:
            dims: dict[int, Any] = {0: torch.export.Dim("batch")} if dynamic_batch else {}
            dims.update({axis: torch.export.Dim.DYNAMIC for axis in spatial})
            program = torch.onnx.export(
                model,
                (example_input,),
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=(dims,) if dims else None,
                opset_version=opset,
                optimize=not keep_batchnorm,
                verbose=False,
            )
            program.save(str(path), external_data=external_data)
    return time.perf_counter() - start


_SPATIAL_NAMES = {1: ["length"], 2: ["height", "width"], 3: ["depth", "height", "width"]}


def _spatial_axis_names(ndim: int) -> dict[int, str]:
    """{axis: name} of the axes after batch and channels of an input with `ndim` axes."""
    names = _SPATIAL_NAMES.get(ndim - 2, [f"dim{i}" for i in range(2, ndim)])
    return {axis: names[axis - 2] for axis in range(2, ndim)}


def _output_names(outputs: Any) -> list[str]:
    """``output`` for one tensor; the keys of a flat dict of tensors (torchvision segmentation's ``out`` and
    ``aux``); else ``output_0, output_1, ...`` in :func:`flat_outputs` order."""
    flat = flat_outputs(outputs)
    if len(flat) == 1:
        return ["output"]
    if (
        isinstance(outputs, dict)
        and len(outputs) == len(flat)
        and all(isinstance(k, str) and k.isidentifier() and k != "input" for k in outputs)
        and all(isinstance(v, torch.Tensor) for v in outputs.values())
    ):
        return list(outputs)
    return [f"output_{i}" for i in range(len(flat))]


def _legacy_dynamic_axes(
    output_names: list[str], ndims: list[int], batch: bool, spatial: dict[int, str], image_list: bool
) -> dict[str, dict[int, str]] | None:
    """The TorchScript exporter's `dynamic_axes`: batch (and spatial) axes of the input, and of each output
    the batch axis and, when it has as many axes as the input, its own spatial axes (an output's size may
    differ from the input's: a UNet's stride)."""
    if image_list:
        return {name: {0: f"{name}_rows"} for name in output_names}
    if not batch and not spatial:
        return None
    axes: dict[str, dict[int, str]] = {"input": {0: "batch"} if batch else {}}
    axes["input"].update(spatial)
    input_ndim = 2 + len(spatial)
    for name, ndim in zip(output_names, ndims, strict=True):
        axes[name] = {0: "batch"} if batch else {}
        if spatial and ndim == input_ndim:
            axes[name].update({axis: f"{name}_{label}" for axis, label in spatial.items()})
    return axes


def takes_image_list(model: nn.Module) -> bool:
    """True for a torchvision detector (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD): its forward takes
    a list of 3-D images and returns one dict of tensors per image."""
    try:
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
    except ImportError:
        return False
    return isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform)


def onnx_op_counts(path: str | os.PathLike) -> dict[str, int]:
    """Node count per op type in the main graph (and nested subgraphs), read with the onnx package."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: Counter[str] = Counter()

    def walk(graph) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    for fn in model.functions:  # onnxscript may keep local functions
        for node in fn.node:
            counts[node.op_type] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def batchnorm_training_nodes(path: str | os.PathLike) -> int:
    """How many BatchNormalization nodes have training_mode=1 (they would normalize with batch stats)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(
        1
        for node in model.graph.node
        if node.op_type == "BatchNormalization"
        and any(a.name == "training_mode" and a.i == 1 for a in node.attribute)
    )


@dataclass
class OnnxExportReport:
    """Everything ``brn export onnx`` reports. `written` is True once the file is in place (a failed
    verification raises VerificationError carrying this report, with `written` False)."""

    output: str
    exporter: str
    opset: int
    input_shape: list[int]
    fp16: bool
    fold: FoldResult | None
    export_seconds: float
    size_bytes: int
    op_counts: dict[str, int]
    external_data: bool
    verify: VerifyReport | None = None
    benchmark: BenchmarkResult | None = None
    written: bool = False
    dynamic_batch: bool = True  # False for a detector (one graph input per image) and for "none"
    dynamic_shape: str = "batch"  # what the graph leaves open: batch, spatial (batch and spatial), none
    dynamic_note: str | None = None  # why "auto" kept the spatial axes fixed, when it did
    image_list: bool = False  # a torchvision detector: one graph input per image

    @property
    def batchnorm_nodes(self) -> int:
        return self.op_counts.get("BatchNormalization", 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "written": self.written,
            "exporter": self.exporter,
            "opset": self.opset,
            "input_shape": self.input_shape,
            "dynamic_batch": self.dynamic_batch,
            "dynamic_shape": self.dynamic_shape,
            "dynamic_note": self.dynamic_note,
            "image_list": self.image_list,
            "fp16": self.fp16,
            "fold": self.fold.to_dict() if self.fold is not None else None,
            "export_seconds": self.export_seconds,
            "size_bytes": self.size_bytes,
            "op_counts": self.op_counts,
            "batchnorm_nodes": self.batchnorm_nodes,
            "external_data": self.external_data,
            "verify": self.verify.to_dict() if self.verify is not None else None,
            "benchmark": self.benchmark.to_dict() if self.benchmark is not None else None,
        }


class _VerificationFailed(Exception):
    pass


class OnnxVerificationError(VerificationError):
    """The exported file failed verification and was not written; `report` holds what was compared."""

    def __init__(self, message: str, report: OnnxExportReport) -> None:
        super().__init__(message)
        self.report = report


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _external_data_path(target: Path) -> Path:
    return target.with_name(target.name + ".data")


def _export_to(model: nn.Module, x: torch.Tensor, staged: Path, *, external: bool, **kw: Any) -> float:
    """Export into `staged`; past 2 GB the weights go to one file beside it, named as the final output's
    (``<target>.data``: the .onnx records that name and reads its weights from its own folder)."""
    if not external:
        return export_onnx(model, x, staged, **kw)
    import onnx

    with tempfile.TemporaryDirectory(dir=staged.parent, prefix="raw-") as scratch:
        raw = Path(scratch) / staged.name
        seconds = export_onnx(model, x, raw, external_data=True, **kw)
        proto = onnx.load(str(raw))  # pulls every external tensor back in
    onnx.save_model(
        proto,
        str(staged),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=_external_data_path(staged).name,
    )
    return seconds


@contextlib.contextmanager
def _staged_output(target: Path, *, external: bool, force: bool) -> Iterator[Path]:
    """Yield where to write the .onnx; move it (and its .data) onto `target` only when the block succeeds.

    A model with external data is staged as a pair in a private folder beside the target, so the staged
    .onnx reads the staged weights during verification, and the previous ``<target>.data`` stays untouched
    until the new pair is verified. The weights move first: a crash between the two renames leaves the
    old .onnx beside the new .data (whose name it references), never an .onnx without weights.
    """
    if not external:
        with atomic_path(target, force=force) as tmp:
            yield tmp
        return
    data = check_writable(_external_data_path(target), force=force)
    remove_stale_temps(target, suffix=STAGING_SUFFIX)  # left by a killed export of the same file
    with temp_dir(target, suffix=STAGING_SUFFIX) as scratch:
        staged = scratch / target.name
        yield staged
        check_writable(target, force=force)  # appeared while we worked
        if _external_data_path(staged).exists():  # absent when every tensor was small enough to inline
            os.replace(_external_data_path(staged), data)
        os.replace(staged, target)


DYNAMIC_SHAPES = ("auto", "batch", "spatial", "none")


@dataclass
class _Settings:
    """What :func:`export_onnx_checked` was asked for, checked."""

    fold: bool
    fp16: bool
    opset: int
    exporter: str
    verify: bool
    atol: float
    rtol: float
    benchmark: bool
    benchmark_repeats: int
    force: bool
    step: Callable[[str], None]
    external_data_threshold: int
    dynamic_shape: str
    verify_data: torch.Tensor | None
    verify_data_from: str | None


def export_onnx_checked(
    model: nn.Module,
    input_shape: Sequence[int],
    output: str | os.PathLike,
    *,
    fold: bool = True,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "legacy",
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    benchmark: bool = False,
    benchmark_repeats: int = 30,
    force: bool = False,
    step: Callable[[str], None] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    dynamic_shape: str = "auto",
    verify_data: torch.Tensor | None = None,
    verify_data_from: str | None = None,
) -> OnnxExportReport:
    """Fold, export, verify, (optionally) benchmark; see the module docstring for the order of things.

    `dynamic_shape`: which input axes the graph leaves open. ``batch``: axis 0; ``spatial``: axis 0 and the
    axes after the channels (H, W; D, H, W; a sequence's length), verified at two sizes, refused in one line
    when the model does not run at a second size; ``none``: every axis fixed; ``auto`` (default): ``spatial``
    for a dense model (an output with as many axes as the input, e.g. a segmentation map) that runs at a
    second size, else ``batch``. `verify_data`: real inputs [M, C, ...] (preprocessed as the model expects)
    to verify on instead of random normal ones; `verify_data_from` names them in the report.

    `model` is not modified (its train/eval mode is restored on return). `step(description)` is called as
    each stage starts (for progress display). Returns the report of a written file. When nothing is written,
    raises: :class:`brn_cli.errors.VerificationError` (with the report as ``.report``) when the file fails
    verification (numbers beyond the tolerance, or onnxruntime cannot run it), BrnError for bad input.
    """
    target = check_writable(output, force=force)
    if benchmark and not fold:
        raise BrnError("`benchmark` compares the folded graph with an unfolded one; drop `fold=False`")
    _check_export_settings(opset=opset, exporter=exporter, atol=atol, rtol=rtol, dynamic_shape=dynamic_shape)
    shape = [int(s) for s in input_shape]
    if len(shape) < 2:
        raise BrnError(f"input shape {shape}: need at least (batch, features)")
    default_atol, default_rtol = default_tolerances(fp16)
    settings = _Settings(
        fold=fold,
        fp16=fp16,
        opset=opset,
        exporter=exporter,
        verify=verify,
        atol=default_atol if atol is None else atol,
        rtol=default_rtol if rtol is None else rtol,
        benchmark=benchmark,
        benchmark_repeats=benchmark_repeats,
        force=force,
        step=step or (lambda _text: None),
        external_data_threshold=external_data_threshold,
        dynamic_shape=dynamic_shape,
        verify_data=verify_data,
        verify_data_from=verify_data_from,
    )
    was_training = model.training
    try:
        return _export_onnx_checked(model.eval(), shape, target, settings)
    finally:
        model.train(was_training)


# The opsets torch's exporters write: 7 is the oldest either accepts; the TorchScript (legacy) exporter stops
# at 20, the dynamo exporter at the newest opset the installed onnx package knows.
MIN_OPSET = 7
LEGACY_MAX_OPSET = 20


def _check_export_settings(
    *, opset: int, exporter: str, atol: float | None, rtol: float | None, dynamic_shape: str = "auto"
) -> None:
    """Refuse, before any work, an opset the exporter cannot write or a tolerance no result could meet."""
    import onnx

    if exporter not in EXPORTERS:
        raise BrnError(
            f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}", param="exporter"
        )
    if dynamic_shape not in DYNAMIC_SHAPES:
        raise BrnError(
            f"dynamic_shape {dynamic_shape!r}: choose one of {', '.join(DYNAMIC_SHAPES)}",
            param="dynamic_shape",
        )
    newest = LEGACY_MAX_OPSET if exporter == "legacy" else onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise BrnError(
            f"`opset` {opset}: the {exporter} exporter writes opsets {MIN_OPSET} to {newest}", param="opset"
        )
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise BrnError(f"`{name}` must be a finite number >= 0, got {value}", param=name)


def _export_onnx_checked(
    reference: nn.Module, shape: list[int], target: Path, opts: _Settings
) -> OnnxExportReport:
    example, outputs = _example_input(reference, shape)
    mode, sizes, note = _dynamic_shape_plan(reference, example, outputs, shape, opts.dynamic_shape)
    if mode == "none" and isinstance(example, torch.Tensor):
        example = torch.randn(shape, dtype=example.dtype)  # the batch is fixed: export it as asked
    if opts.verify and opts.verify_data is not None:
        check_examples(opts.verify_data, shape[1:])
    export_model, example, fold_result = _model_to_export(
        reference, example, fold=opts.fold, fp16=opts.fp16, step=opts.step
    )
    external = _model_bytes(export_model) > opts.external_data_threshold
    report = OnnxExportReport(
        output=str(target),
        exporter=opts.exporter,
        opset=opts.opset,
        input_shape=shape,
        fp16=opts.fp16,
        fold=fold_result,
        export_seconds=float("nan"),
        size_bytes=0,
        op_counts={},
        external_data=external,
        dynamic_batch=mode in ("batch", "spatial"),
        dynamic_shape=mode,
        dynamic_note=note,
        image_list=isinstance(example, list),
    )
    try:
        with _staged_output(target, external=external, force=opts.force) as tmp:
            opts.step(f"exporting ({opts.exporter} exporter, opset {opts.opset})")
            _export_into(report, export_model, example, tmp, keep_batchnorm=not opts.fold)
            if opts.verify:
                _verify_into(report, tmp, reference, sizes, opts, image_list=isinstance(example, list))
            if opts.benchmark:
                opts.step("benchmarking folded against unfolded")
                report.benchmark = _benchmark_against_unfolded(
                    reference,
                    example,
                    tmp,
                    shape,
                    fp16=opts.fp16,
                    opset=opts.opset,
                    exporter=opts.exporter,
                    repeats=opts.benchmark_repeats,
                    dynamic=mode,
                )
    except _VerificationFailed:
        raise OnnxVerificationError(
            f"verification failed: {report.verify.failure()}; {target} not written", report
        ) from None
    report.written = True
    return report


def _verify_into(
    report: OnnxExportReport,
    staged: Path,
    reference: nn.Module,
    sizes: list[list[int]],
    opts: _Settings,
    *,
    image_list: bool,
) -> None:
    """Verify the staged file against `reference` at every size in `sizes`; raise _VerificationFailed if it fails."""
    opts.step("verifying with onnxruntime")
    report.verify = verify_onnx(
        staged,
        reference,
        report.input_shape,
        atol=opts.atol,
        rtol=opts.rtol,
        image_list=image_list,
        sizes=sizes,
        batches=[report.input_shape[0]] if report.dynamic_shape == "none" else None,
        examples=opts.verify_data,
        examples_from=opts.verify_data_from,
    )
    if not report.verify.passed:
        raise _VerificationFailed


Example = torch.Tensor | list[torch.Tensor]


def _example_input(model: nn.Module, shape: list[int]) -> tuple[Example, list[torch.Tensor]]:
    """A random input of `shape` in the model's dtype, checked to run, with the model's flat outputs on it;
    its batch is at least 2, so the exporter cannot specialise the batch axis to 1. A torchvision detector
    gets a list of `shape[0]` images in [0, 1] instead: its graph has one input per image."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if takes_image_list(model):
        example: Example = list(torch.rand(shape[0], *shape[1:], dtype=dtype).unbind(0))
    else:
        example = torch.randn(max(2, shape[0]), *shape[1:], dtype=dtype)
    try:
        with torch.no_grad():
            outputs = flat_outputs(model(example))
    except Exception as exc:
        raise BrnError(
            f"the model does not run on input shape {shape} ({type(exc).__name__}: "
            f"{first_line(exc)}); pass the right `input_shape`"
        ) from None
    if not outputs:
        raise BrnError("the model returns no tensor; nothing to export")
    return example, outputs


def _dynamic_shape_plan(
    model: nn.Module, example: Example, outputs: list[torch.Tensor], shape: list[int], asked: str
) -> tuple[str, list[list[int]], str | None]:
    """(the dynamic shape to export with, the spatial sizes to verify at, why ``auto`` chose no spatial axes).

    Spatial axes are made dynamic only where the PyTorch model runs at a second size: the next multiple of 32
    above each spatial axis of the export size (96 -> 128, 28 -> 32)."""
    size = shape[2:]
    if isinstance(example, list) or asked in ("batch", "none") or not size:
        why = _never_spatial(example, shape)
        if asked == "spatial" and why:
            raise BrnError(f"dynamic_shape spatial: {why}", param="dynamic_shape")
        return ("none" if isinstance(example, list) else "batch" if asked == "auto" else asked), [size], None
    if asked == "auto" and not any(t.ndim == len(shape) for t in outputs):
        return "batch", [size], None  # no dense output (a classifier, an embedding): today's export
    second = [(s // 32 + 1) * 32 for s in size]
    why = _fails_at_size(model, example, second)
    if why is not None:
        if asked == "spatial":
            raise BrnError(f"dynamic_shape spatial: {why}; pass `dynamic_shape=batch`", param="dynamic_shape")
        return "batch", [size], f"spatial axes kept fixed: {why}"
    return "spatial", [size, second], None


def _never_spatial(example: Example, shape: list[int]) -> str | None:
    """Why an input can have no dynamic spatial axes, whatever the model (None when it can)."""
    if isinstance(example, list):
        return "a torchvision detector takes one input per image, each of a fixed shape"
    if len(shape) < 3:
        return f"the input {shape} has no spatial axes (batch and features only)"
    return None


def _fails_at_size(model: nn.Module, example: torch.Tensor, size: list[int]) -> str | None:
    """Why `model` does not run on inputs of spatial `size` (None when it does), naming the layer that failed:
    the last one entered before the error."""
    entered: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, _a, name=name: entered.append(name))
        for name, module in model.named_modules()
        if name and not list(module.children())
    ]
    probe = torch.randn(example.shape[0], example.shape[1], *size, dtype=example.dtype)
    try:
        with torch.no_grad():
            model(probe)
    except Exception as exc:
        where = (
            f" in layer {entered[-1]!r} ({type(model.get_submodule(entered[-1])).__name__})"
            if entered
            else ""
        )
        return (
            f"the model runs only at its export size {list(example.shape[2:])}: at {size} it fails{where} "
            f"({type(exc).__name__}: {first_line(exc, 160)})"
        )
    finally:
        for hook in hooks:
            hook.remove()
    return None


def _model_to_export(
    model: nn.Module, example: Example, *, fold: bool, fp16: bool, step: Callable[[str], None]
) -> tuple[nn.Module, Example, FoldResult | None]:
    """(the model to export, its example input, the fold result): a folded copy of `model`, or a plain copy
    with ``fold=False``; cast to float16 after folding, so the folding arithmetic stays in full precision."""
    fold_result: FoldResult | None = None
    if fold and isinstance(example, list):
        raise BrnError(
            "a torchvision detector cannot be folded: torch.fx cannot trace its forward (a loop over the "
            "list of images); pass `fold=False` to export without folding",
            param="fold",
        )
    if fold:
        step("folding norms")
        try:
            fold_result = fold_model(model, (example,))
        except TraceError as exc:
            raise BrnError(f"{exc}; pass `fold=False` to export without folding", param="fold") from None
        export_model = fold_result.model
    else:
        export_model = copy.deepcopy(model).eval()
    if fp16:
        export_model = export_model.half()
        example = [t.half() for t in example] if isinstance(example, list) else example.half()
    return export_model, example, fold_result


def _export_into(
    report: OnnxExportReport, model: nn.Module, example: torch.Tensor, staged: Path, *, keep_batchnorm: bool
) -> None:
    """Export `model` into `staged` and record the time, size and op counts in `report`; refuses a graph that
    would normalize with batch statistics."""
    try:
        report.export_seconds = _export_to(
            model,
            example,
            staged,
            external=report.external_data,
            opset=report.opset,
            exporter=report.exporter,
            keep_batchnorm=keep_batchnorm,
            dynamic_batch=report.dynamic_shape != "none",
            dynamic_spatial=report.dynamic_shape == "spatial",
        )
    except BrnError:
        raise
    except Exception as exc:
        raise BrnError(
            f"torch.onnx.export ({report.exporter}) failed: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    report.size_bytes = sum(p.stat().st_size for p in (staged, _external_data_path(staged)) if p.exists())
    report.op_counts = onnx_op_counts(staged)
    if batchnorm_training_nodes(staged):
        raise BrnError("the exported graph has BatchNormalization in training mode; nothing written")


def _benchmark_against_unfolded(
    model: nn.Module,
    example: torch.Tensor,
    folded: Path,
    shape: list[int],
    *,
    fp16: bool,
    opset: int,
    exporter: str,
    repeats: int,
    dynamic: str = "batch",
) -> BenchmarkResult:
    """ORT latency of the `folded` file against an unfolded export of `model` (BatchNormalization kept),
    exported with the same `dynamic` axes."""
    with tempfile.TemporaryDirectory(prefix="brn-bench-") as scratch:
        unfolded = Path(scratch) / "unfolded.onnx"
        plain = copy.deepcopy(model).eval()
        if fp16:
            plain = plain.half()
        export_onnx(
            plain,
            example,
            unfolded,
            opset=opset,
            exporter=exporter,
            keep_batchnorm=True,
            dynamic_batch=dynamic != "none",
            dynamic_spatial=dynamic == "spatial",
        )
        return benchmark_onnx(
            {"folded": folded, "unfolded": unfolded}, [max(1, shape[0]), *shape[1:]], repeats=repeats
        )
