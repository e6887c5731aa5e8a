"""Check an exported ONNX file against the PyTorch model it came from, and time it (separate from export).

Verification runs onnxruntime on several inputs (random normal, or real examples the caller passes), at
batch 1 and at a larger batch (and, for a graph with dynamic spatial axes, at two resolutions), with graph
optimizations disabled *and* at the default level (ORT's own Conv+BN fusion at the default level could hide
an unfolded or wrongly folded file), on the CPU provider and on CUDA when a session really starts there.
The reference is the caller's PyTorch eval model, normally the original *unfolded* one, so the check covers
folding and export together.

A check passes when, for every output tensor, ``max|onnx - torch| <= atol + rtol * max|torch|``: the relative
part is measured against the output's scale, not element by element. Rounding error (fp32, and fp16 above
all) grows with the magnitude of the intermediate values, so an element near zero in an output of scale 40
carries the same absolute error as its neighbours; numpy's elementwise allclose rule fails correct fp16
exports for that reason. Reported per check: the input shape, max absolute error, max relative error
``max|onnx - torch| / max|torch|``, for classifier-shaped outputs ([N, K], K > 1) the fraction of rows whose
arg-max agrees, and per output tensor (by its ONNX name) its shape, max absolute error, scale and tolerance.

The scale is measured on the inputs given: random normal inputs drive a network trained on normalized images
to activations it never sees (a calibrated DeepLabV3 gave outputs near 4500 and a relative error of 4.4e-4 on
them, 1.8e-6 on its own data), so real examples (``examples``) give the meaningful numbers. An onnxruntime
run-time error (a shape the graph does not accept) fails its check with the error as the cause.

A torchvision detector's per-image detections are compared detection by detection, paired by label and box
(:mod:`brn_cli.deploy.detections`), and each check reports how many it paired.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from brn_cli.deploy.detections import (
    MASK_ATOL,
    DetectionTally,
    detection_groups,
    match_image,
    near_tie,
    shifted_mask_difference,
)
from brn_cli.errors import BrnError, first_line
from brn_cli.nn.outputs import flat_outputs

__all__ = [
    "BenchmarkResult",
    "OutputCheck",
    "VerifyCheck",
    "VerifyReport",
    "benchmark_onnx",
    "check_examples",
    "data_examples",
    "ort_providers",
    "recorded_data",
    "verify_onnx",
]

_OPT_LEVELS = ("disabled", "default")


@dataclass
class OutputCheck:
    """One output tensor over a check's inputs, at the input where it came closest to its tolerance."""

    name: str  # the ONNX output name
    shape: list[int]
    max_abs: float
    scale: float  # max|torch| of this output on that input
    tolerance: float  # atol + rtol * scale
    passed: bool


@dataclass
class VerifyCheck:
    """One (provider, ORT optimization level, input shape) comparison over several inputs."""

    provider: str
    optimization: str
    batch: int
    inputs: int
    max_abs: float
    max_rel: float
    top1: float | None
    passed: bool
    mismatch: str | None = None  # how the outputs differ in count or shape, when they do
    input_shape: list[int] = field(default_factory=list)
    outputs: list[OutputCheck] = field(default_factory=list)
    error: str | None = None  # onnxruntime failed to run the input: its cause
    detections: DetectionTally | None = None  # a detector's outputs, compared detection by detection

    def failure(self) -> str | None:
        """Why this check failed, in one line (None when it passed)."""
        if self.passed:
            return None
        if self.error or self.mismatch:
            return self.error or self.mismatch
        worst = next((o for o in self.outputs if not o.passed), None)
        if worst is None:
            return f"non-finite values at input {self.input_shape}"
        return (
            f"output {worst.name!r} {worst.shape} at input {self.input_shape}: max abs {worst.max_abs:.3g} "
            f"beyond the tolerance {worst.tolerance:.3g} (`atol` + `rtol` x scale {worst.scale:.3g})"
        )


@dataclass
class VerifyReport:
    atol: float
    rtol: float
    checks: list[VerifyCheck] = field(default_factory=list)
    inputs: str = "random normal inputs"  # what was fed: random normal inputs, or the caller's examples

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=float("nan"))

    @property
    def input_shapes(self) -> list[list[int]]:
        """The input shapes compared, in order, once each."""
        return [list(s) for s in dict.fromkeys(tuple(c.input_shape) for c in self.checks)]

    def failure(self) -> str | None:
        """Why verification failed, in one line: the first failed check's cause (None when it passed)."""
        if not self.checks:
            return "nothing was compared"
        return next((c.failure() for c in self.checks if not c.passed), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
            "inputs": self.inputs,
            "input_shapes": self.input_shapes,
            "checks": [asdict(c) for c in self.checks],
        }


def _session_options(level: str, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: a CUDA provider that fails to load must not spam the user
    # "default" is what InferenceSession does when not told otherwise: every optimization enabled.
    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts.graph_optimization_level = levels[level]
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


@functools.lru_cache(maxsize=1)
def _cuda_works() -> bool:
    """True only if onnxruntime lists CUDA *and* a session actually starts on it (onnxruntime-gpu on a
    machine without a GPU lists it anyway)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    # The failed CUDA load is logged through ORT's default logger (not the session's): mute it meanwhile.
    ort.set_default_logger_severity(4)
    try:
        from onnx import TensorProto, helper

        node = helper.make_node("Relu", ["x"], ["y"])
        graph = helper.make_graph(
            [node],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        probe.ir_version = min(probe.ir_version, 9)
        sess = ort.InferenceSession(
            probe.SerializeToString(),
            _session_options("default"),
            providers=["CUDAExecutionProvider"],
        )
        return "CUDAExecutionProvider" in sess.get_providers()
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(2)  # ORT's default: warnings and above


def ort_providers() -> list[str]:
    """Execution providers to verify on: CPU always, CUDA when a session really runs there."""
    return (["CUDAExecutionProvider"] if _cuda_works() else []) + ["CPUExecutionProvider"]


def _session(path: str | os.PathLike, provider: str, level: str, threads: int | None = None):
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), _session_options(level, threads), providers=[provider])
    except Exception as exc:
        raise BrnError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None
    return sess


Groups = list[dict[str, int]] | None  # per image, {key: flat output index} of a detector's detections
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _outputs(model: nn.Module, x: torch.Tensor, image_list: bool) -> tuple[list[np.ndarray], Groups]:
    """The flat outputs of `model` on `x`, and for a detector where each image's detections are in them."""
    out = model(list(x.unbind(0)) if image_list else x)
    groups = detection_groups(out) if image_list else None
    return [t.detach().float().cpu().numpy() for t in flat_outputs(out)], groups


def _inputs(
    shape: Sequence[int],
    batch: int,
    count: int,
    seed: int,
    dtype: torch.dtype,
    image_list: bool,
    examples: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """`count` inputs of [batch, *shape[1:]]: drawn at random, or taken in turn from `examples` (resized to
    the spatial size of `shape` when theirs differs)."""
    if examples is not None:
        return _example_inputs(examples, shape, batch, count, dtype)
    gen = torch.Generator().manual_seed(seed + batch)
    if image_list:  # images in [0, 1], as a detector's transform expects them
        return [torch.rand(batch, *shape[1:], generator=gen, dtype=dtype) for _ in range(count)]
    return [torch.randn(batch, *shape[1:], generator=gen, dtype=dtype) for _ in range(count)]


_RESIZE_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}  # by number of spatial axes


def _example_inputs(
    examples: torch.Tensor, shape: Sequence[int], batch: int, count: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """`count` batches of `batch` consecutive examples (wrapping around), resized to `shape`'s spatial size."""
    want = [int(s) for s in shape[1:]]
    check_examples(examples, want)
    index = torch.arange(batch * count) % examples.shape[0]
    picked = examples[index].to(dtype)
    if list(picked.shape[1:]) != want:
        mode = _RESIZE_MODES[len(want) - 1]
        picked = torch.nn.functional.interpolate(picked.float(), size=want[1:], mode=mode).to(dtype)
    return list(picked.split(batch))


def check_examples(examples: torch.Tensor, sample_shape: Sequence[int]) -> None:
    """Refuse examples for verification that cannot be fed at `sample_shape` ([C, ...]): another rank, another
    channel count, or another size of a non-spatial input ([features]). Images, volumes and sequences at
    another spatial size are resized."""
    got = [int(s) for s in examples.shape[1:]]
    want = [int(s) for s in sample_shape]
    if examples.ndim < 2 or examples.shape[0] == 0:
        raise BrnError(
            f"`verify_data` needs a batch of examples [N, ...], got shape {list(examples.shape)}",
            param="verify_data",
        )
    resizable = len(want) - 1 in _RESIZE_MODES
    if len(got) != len(want) or got[:1] != want[:1] or (got != want and not resizable):
        raise BrnError(
            f"`verify_data`: the examples have shape {got}, the exported model takes {want}",
            param="verify_data",
        )


def _model_dtype(model: nn.Module) -> torch.dtype:
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    return ref.dtype if ref is not None else torch.float32


def _feed(sess, x: torch.Tensor, image_list: bool) -> dict[str, np.ndarray]:
    """ORT's inputs for one batch: the batch itself, or one image per graph input for an image-list model."""
    inputs = sess.get_inputs()
    parts = list(x.unbind(0)) if image_list else [x]
    if len(inputs) != len(parts):
        raise BrnError(f"the ONNX graph takes {len(inputs)} inputs; the check feeds {len(parts)}")
    return {
        i.name: p.numpy().astype(_ORT_DTYPES.get(i.type, np.float32))
        for i, p in zip(inputs, parts, strict=True)
    }


@dataclass
class _Tally:
    """Running comparison of one check's outputs."""

    atol: float
    rtol: float
    classifier: bool = True  # count arg-max agreement of [N, K] outputs (not for a detector's boxes)
    max_abs: float = 0.0
    max_rel: float = 0.0
    agree: int = 0
    rows: int = 0
    ok: bool = True
    mismatch: str | None = None
    error: str | None = None
    outputs: dict[int, OutputCheck] = field(default_factory=dict)
    groups: Groups = None  # a detector's outputs: compared detection by detection
    detections: DetectionTally | None = None

    def add(self, got: list[np.ndarray], want: list[np.ndarray], names: Sequence[str]) -> None:
        """Compare every ONNX output with the flattened PyTorch output in the same position."""
        if len(got) != len(want):
            self._fail(f"the ONNX graph returns {len(got)} output tensors, the PyTorch model {len(want)}")
            return
        paired = self._add_detections(got, want, names) if self.groups else set()
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if i in paired:
                continue
            g = np.asarray(g, dtype=np.float64)
            w = w.astype(np.float64)
            if g.shape != w.shape:
                self._fail(f"output tensor {i}: ONNX shape {list(g.shape)}, PyTorch {list(w.shape)}")
                continue
            self._add_tensor(i, names[i] if i < len(names) else f"#{i}", g, w)
        w0 = want[0] if want else None
        if (
            self.classifier
            and w0 is not None
            and w0.ndim == 2
            and w0.shape[1] > 1
            and got[0].shape == w0.shape
        ):
            self.agree += int((np.argmax(got[0], 1) == np.argmax(w0, 1)).sum())
            self.rows += w0.shape[0]

    def _add_tensor(self, index: int, name: str, g: np.ndarray, w: np.ndarray) -> None:
        finite = np.all(np.isfinite(g)) or np.array_equal(np.isfinite(g), np.isfinite(w))
        diff = np.abs(g - w)
        worst = float(np.where(np.isfinite(diff), diff, np.inf).max(initial=0.0))
        self._record(index, name, list(w.shape), worst, float(np.abs(w).max(initial=0.0)), bool(finite))

    def _tolerance(self, w: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(w).max(initial=0.0))

    def _add_detections(
        self, got: list[np.ndarray], want: list[np.ndarray], names: Sequence[str]
    ) -> set[int]:
        """Compare each image's detections pair by pair (:mod:`brn_cli.deploy.detections`): boxes, scores,
        masks, ... of the paired rows; returns the flat output indices compared."""
        tally = self.detections = self.detections or DetectionTally()
        for image, group in enumerate(self.groups or []):
            g = {k: np.asarray(got[i], dtype=np.float64) for k, i in group.items()}
            w = {k: want[i].astype(np.float64) for k, i in group.items()}
            bad = next((k for k in group if g[k].shape[1:] != w[k].shape[1:]), None)
            if bad is not None:
                self._fail(
                    f"output tensor {group[bad]} ({bad} of image {image}): ONNX shape {list(g[bad].shape)}, "
                    f"PyTorch {list(w[bad].shape)}"
                )
                continue
            match = match_image(g, w, self._tolerance(w["boxes"]))
            tally.masks = tally.masks or "masks" in group
            self._tally_unpaired(image, match, g, w, tally)
            rows_w, rows_g = [i for i, _ in match.pairs], [j for _, j in match.pairs]
            for key, index in group.items():
                gk, wk = g[key][rows_g], w[key][rows_w]
                worst = float(np.abs(gk - wk).max(initial=0.0))
                atol = max(self.atol, MASK_ATOL) if key == "masks" else self.atol
                tolerance = atol + self.rtol * float(np.abs(w[key]).max(initial=0.0))
                if key == "masks" and worst > tolerance:  # boxes truncated to other pixels: see detections.py
                    shifts = [shifted_mask_difference(a, b) for a, b in zip(gk, wk, strict=True)]
                    moved = [abs(a - b).max() > tolerance for a, b in zip(gk, wk, strict=True)]
                    tally.masks_shifted += sum(
                        m and d <= tolerance for m, d in zip(moved, shifts, strict=True)
                    )
                    worst = max(shifts, default=0.0)
                name = names[index] if index < len(names) else f"#{index}"
                scale = float(np.abs(w[key]).max(initial=0.0))
                finite = bool(np.all(np.isfinite(gk)))
                self._record(index, name, list(w[key].shape), worst, scale, finite, atol=atol)
        return {i for group in self.groups or [] for i in group.values()}

    def _tally_unpaired(self, image: int, match, g: dict, w: dict, tally: DetectionTally) -> None:
        """Count one image's pairs, and its unpaired detections: explained by a near tie, or a failure."""
        ws, gs = w["scores"].reshape(-1), g["scores"].reshape(-1)
        lowest = float(np.concatenate([ws, gs]).min(initial=np.inf))
        score_tol = self._tolerance(ws)
        lost = near_tie(ws[match.want_left], lowest, score_tol)
        extra = near_tie(gs[match.got_left], lowest, score_tol)
        tally.reference += len(ws)
        tally.onnx += len(gs)
        tally.matched += len(match.pairs)
        tally.near_ties += sum(lost) + sum(extra)
        unexplained = lost.count(False) + extra.count(False)
        tally.unmatched += unexplained
        if unexplained:
            self.ok = False
            self.mismatch = self.mismatch or (
                f"image {image}: {lost.count(False)} of {len(ws)} PyTorch detections have no ONNX detection of "
                f"the same label with a box within {self._tolerance(w['boxes']):.3g} (nearest at "
                f"{match.nearest:.3g}), {extra.count(False)} of {len(gs)} ONNX detections none in PyTorch; "
                "their scores are not at a near tie"
            )

    def _record(
        self, index: int, name: str, shape: list[int], worst: float, scale: float, finite: bool, atol=None
    ) -> None:
        tolerance = (self.atol if atol is None else atol) + self.rtol * scale
        passed = finite and worst <= tolerance
        self.max_abs = max(self.max_abs, worst)
        self.max_rel = max(self.max_rel, worst / max(scale, 1e-30))
        self.ok = self.ok and passed
        seen = self.outputs.get(index)
        this = OutputCheck(name, shape, worst, scale, tolerance, passed)
        if seen is None or _closeness(this) > _closeness(seen):
            self.outputs[index] = this

    def _fail(self, why: str) -> None:
        self.ok = False
        self.max_abs = self.max_rel = float("inf")
        self.mismatch = self.mismatch or why

    def run_failed(self, why: str) -> None:
        self.ok = False
        self.max_abs = self.max_rel = float("inf")
        self.error = self.error or why


def _closeness(check: OutputCheck) -> float:
    """How near an output came to its tolerance (> 1: beyond it); a failure always ranks first."""
    if not check.passed:
        return math.inf
    return check.max_abs / check.tolerance if check.tolerance > 0 else (math.inf if check.max_abs else 0.0)


@torch.no_grad()
def verify_onnx(
    path: str | os.PathLike,
    reference: nn.Module,
    input_shape: Sequence[int],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    batches: Sequence[int] | None = None,
    inputs_per_batch: int = 2,
    providers: Sequence[str] | None = None,
    optimization_levels: Sequence[str] = _OPT_LEVELS,
    seed: int = 0,
    image_list: bool = False,
    sizes: Sequence[Sequence[int]] | None = None,
    examples: torch.Tensor | None = None,
    examples_from: str | None = None,
) -> VerifyReport:
    """Compare the ONNX file at `path` with `reference` (put in eval mode for the call).

    Every output tensor is compared: the ONNX outputs in order against the PyTorch outputs flattened by
    :func:`brn_cli.nn.outputs.flat_outputs`; a different count or shape fails the check and says so in
    ``mismatch``, an onnxruntime run-time error fails it with the error in ``error``. `batches` defaults to
    (1, max(2, input_shape[0])); `sizes` (the axes after the channels: [H, W] for images) to the one of
    `input_shape`; every batch is checked at every size. Inputs are random normal, or, given `examples`
    ([M, C, ...] real inputs, already preprocessed; `examples_from` says what they are in the report), taken
    from them in turn and resized to each size. They are made in the reference model's dtype and cast to the
    ONNX input's dtype (an fp16 export is compared against the fp32 reference). `image_list`: the model takes
    a list of 3-D images (a torchvision detector) and the graph one input per image, so its batch is fixed:
    only ``input_shape[0]`` is checked.
    """
    randoms = "random images uniform in [0, 1]" if image_list else "random normal inputs"
    described = examples_from or ("the examples given" if examples is not None else randoms)
    report = VerifyReport(atol=atol, rtol=rtol, inputs=described)
    if batches is None:
        batches = [int(input_shape[0])] if image_list else [1, max(2, int(input_shape[0]))]
    sizes = [list(input_shape[2:])] if sizes is None else [[int(d) for d in size] for size in sizes]
    shapes = [(int(b), int(input_shape[1]), *size) for size in sizes for b in batches]
    providers = list(providers) if providers is not None else ort_providers()
    was_training = reference.training
    reference.eval()
    try:
        dtype = _model_dtype(reference)
        data = {s: _inputs(s, s[0], inputs_per_batch, seed, dtype, image_list, examples) for s in shapes}
        results = {s: [_outputs(reference, x, image_list) for x in xs] for s, xs in data.items()}
        expected = {s: [flat for flat, _ in rs] for s, rs in results.items()}
        groups = next((g for rs in results.values() for _, g in rs), None)
    finally:
        reference.train(was_training)
    for provider in providers:
        for level in optimization_levels:
            sess = _session(path, provider, level)
            for shape in shapes:
                tally = _compare(sess, data[shape], expected[shape], atol, rtol, image_list, groups)
                report.checks.append(_check_from(tally, provider, level, list(shape), len(data[shape])))
    return report


def _compare(
    sess,
    inputs: list[torch.Tensor],
    expected: list[list[np.ndarray]],
    atol: float,
    rtol: float,
    image_list: bool,
    groups: Groups = None,
) -> _Tally:
    """Run every input through `sess` and compare with the PyTorch outputs; a run-time error ends the check."""
    tally = _Tally(atol=atol, rtol=rtol, classifier=not image_list, groups=groups)
    names = [o.name for o in sess.get_outputs()]
    for x, want in zip(inputs, expected, strict=True):
        feed = _feed(sess, x, image_list)
        try:
            got = sess.run(None, feed)
        except Exception as exc:  # onnxruntime's own error types (InvalidArgument, Fail, ...)
            tally.run_failed(
                f"onnxruntime failed on input {list(x.shape)}: {type(exc).__name__}: {first_line(exc)}"
            )
            break
        tally.add(got, want, names)
    return tally


def _check_from(tally: _Tally, provider: str, level: str, shape: list[int], inputs: int) -> VerifyCheck:
    return VerifyCheck(
        provider=provider.replace("ExecutionProvider", ""),
        optimization=level,
        batch=shape[0],
        inputs=inputs,
        max_abs=tally.max_abs,
        max_rel=tally.max_rel,
        top1=tally.agree / tally.rows if tally.rows else None,
        passed=tally.ok,
        mismatch=tally.mismatch,
        input_shape=shape,
        outputs=[tally.outputs[i] for i in sorted(tally.outputs)],
        error=tally.error,
        detections=tally.detections,
    )


def data_examples(
    model: nn.Module,
    spec: str | os.PathLike,
    *,
    preprocessing: dict[str, Any] | None = None,
    val_split: float | None = None,
    seed: int = 0,
    count: int = 16,
) -> tuple[torch.Tensor, str]:
    """Real inputs to verify an export on: ``(examples [n, C, ...], what they are)``.

    The data `spec` is loaded with brn's data loader (:func:`brn_cli.data.datasets.load_data`) and
    `preprocessing` (its ``normalize``, ``image_size``, ``resize_size``: as evaluate applies a checkpoint's
    record, :func:`brn_cli.data.specs.preprocessing_for`); an image folder's channels follow the model's first
    layer. Up to `count` examples spread evenly over the validation split (the training set when there is
    none) are stacked."""
    from brn_cli.data.datasets import fit_data_to_model, load_data

    bundle = load_data(spec, val_split=val_split, seed=seed, **(preprocessing or {}))
    has_val = bundle.val is not None and len(bundle.val) > 0  # type: ignore[arg-type]
    fit_data_to_model(model, bundle, split="val" if has_val else "train", labels=False)
    dataset = bundle.val if has_val else bundle.train
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise BrnError(f"`verify_data` {spec}: no examples to verify on", param="verify_data")
    picked = torch.linspace(0, total - 1, min(count, total)).round().long().unique().tolist()
    examples = torch.stack([torch.as_tensor(dataset[i][0], dtype=torch.float32) for i in picked])
    split = "validation" if has_val else "training"
    return examples, f"{len(picked)} {split} examples of {bundle.source or spec}"


def recorded_data(
    training: dict[str, Any] | None, path: str | os.PathLike
) -> tuple[dict[str, Any] | None, str]:
    """The data a checkpoint written by fine-tuning records (its ``training.config``), as keyword arguments of
    :func:`data_examples` (``spec``, ``val_split``, ``seed``), and a note saying what was found. None when the
    file records no data, or data brn does not load from a file (code) or that is no longer there."""
    from brn_cli.storage.checkpoint import check_recorded_data

    config = (training or {}).get("config")
    spec = config.get("data") if isinstance(config, dict) else None
    if not spec:
        return None, f"{path} records no data"
    try:
        spec = check_recorded_data(spec, path=path)
    except BrnError:
        return None, f"{path} records data that is code, which brn does not run from a file"
    if not os.path.exists(spec):
        return None, f"the data {path} records, {spec}, is not there"
    val_split = config.get("val_split")
    seed = config.get("seed", 0)
    options = {
        "spec": spec,
        "val_split": float(val_split) if isinstance(val_split, (int, float)) else None,
        "seed": int(seed) if isinstance(seed, int) else 0,
    }
    return options, f"the data {path} records, {spec}"


@dataclass
class BenchmarkResult:
    """Median ORT latency (ms) of each contender per optimization level, measured interleaved."""

    threads: int
    repeats: int
    batch: int
    median_ms: dict[str, dict[str, float]]  # level -> contender -> ms

    def ratio(self, level: str, slow: str = "unfolded", fast: str = "folded") -> float:
        return self.median_ms[level][slow] / self.median_ms[level][fast]

    def to_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "repeats": self.repeats,
            "batch": self.batch,
            "median_ms": self.median_ms,
            "ratio_unfolded_over_folded": {lvl: self.ratio(lvl) for lvl in self.median_ms},
        }


def benchmark_onnx(
    paths: dict[str, str | os.PathLike],
    input_shape: Sequence[int],
    *,
    repeats: int = 30,
    warmup: int = 3,
    threads: int = 1,
    levels: Sequence[str] = _OPT_LEVELS,
    provider: str = "CPUExecutionProvider",
    progress: Callable[[int], None] | None = None,
) -> BenchmarkResult:
    """ORT latency of several ONNX files side by side: each repetition runs every contender once, in
    turn, so machine noise hits them alike; reports medians. `progress(advance)` is called per repetition."""
    x = np.random.default_rng(0).standard_normal(tuple(input_shape))
    result: dict[str, dict[str, float]] = {}
    for level in levels:
        sessions = {}
        for name, path in paths.items():
            sess = _session(path, provider, level, threads)
            inp = sess.get_inputs()[0]
            sessions[name] = (sess, {inp.name: x.astype(_ORT_DTYPES.get(inp.type, np.float32))})
        for sess, feed in sessions.values():
            for _ in range(warmup):
                sess.run(None, feed)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(repeats):
            for name, (sess, feed) in sessions.items():
                start = time.perf_counter()
                sess.run(None, feed)
                times[name].append(time.perf_counter() - start)
            if progress is not None:
                progress(1)
        result[level] = {name: 1000 * statistics.median(ts) for name, ts in times.items()}
    return BenchmarkResult(threads=threads, repeats=repeats, batch=int(input_shape[0]), median_ms=result)
