"""Check an exported ONNX file against the PyTorch model it came from, and time it (separate from export).

Verification runs onnxruntime on several random inputs, at batch 1 and at a larger batch, with graph
optimizations disabled *and* at the default level (ORT's own Conv+BN fusion at the default level could hide
an unfolded or wrongly folded file), on the CPU provider and on CUDA when a session really starts there.
The reference is the caller's PyTorch eval model, normally the original *unfolded* one, so the check covers
folding and export together.

A check passes when, for every output tensor, ``max|onnx - torch| <= atol + rtol * max|torch|``: the relative
part is measured against the output's scale, not element by element. Rounding error (fp32, and fp16 above
all) grows with the magnitude of the intermediate values, so an element near zero in an output of scale 40
carries the same absolute error as its neighbours; numpy's elementwise allclose rule fails correct fp16
exports for that reason. Reported per check: max absolute error, max relative error
``max|onnx - torch| / max|torch|`` and, for classifier-shaped outputs ([N, K], K > 1), the fraction of rows
whose arg-max agrees.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from brn_cli.errors import BrnError, first_line
from brn_cli.nn.outputs import flat_outputs

__all__ = [
    "BenchmarkResult",
    "VerifyCheck",
    "VerifyReport",
    "benchmark_onnx",
    "ort_providers",
    "verify_onnx",
]

_OPT_LEVELS = ("disabled", "default")


@dataclass
class VerifyCheck:
    """One (provider, ORT optimization level, batch size) comparison over several random inputs."""

    provider: str
    optimization: str
    batch: int
    inputs: int
    max_abs: float
    max_rel: float
    top1: float | None
    passed: bool
    mismatch: str | None = None  # how the outputs differ in count or shape, when they do


@dataclass
class VerifyReport:
    atol: float
    rtol: float
    checks: list[VerifyCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=float("nan"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "rtol": self.rtol,
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


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _outputs(model: nn.Module, x: torch.Tensor, image_list: bool) -> list[np.ndarray]:
    model_input = list(x.unbind(0)) if image_list else x
    return [t.detach().float().cpu().numpy() for t in flat_outputs(model(model_input))]


def _inputs(
    shape: Sequence[int], batch: int, count: int, seed: int, dtype: torch.dtype, image_list: bool
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + batch)
    if image_list:  # images in [0, 1], as a detector's transform expects them
        return [torch.rand(batch, *shape[1:], generator=gen, dtype=dtype) for _ in range(count)]
    return [torch.randn(batch, *shape[1:], generator=gen, dtype=dtype) for _ in range(count)]


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

    def add(self, got: list[np.ndarray], want: list[np.ndarray]) -> None:
        """Compare every ONNX output with the flattened PyTorch output in the same position."""
        if len(got) != len(want):
            self._fail(f"the ONNX graph returns {len(got)} output tensors, the PyTorch model {len(want)}")
            return
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            g = np.asarray(g, dtype=np.float64)
            w = w.astype(np.float64)
            if g.shape != w.shape:
                self._fail(f"output tensor {i}: ONNX shape {list(g.shape)}, PyTorch {list(w.shape)}")
                continue
            self._add_tensor(g, w)
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

    def _add_tensor(self, g: np.ndarray, w: np.ndarray) -> None:
        if not np.all(np.isfinite(g)) and not np.array_equal(np.isfinite(g), np.isfinite(w)):
            self.ok = False
        diff = np.abs(g - w)
        worst = float(np.where(np.isfinite(diff), diff, np.inf).max(initial=0.0))
        scale = float(np.abs(w).max(initial=0.0))
        self.max_abs = max(self.max_abs, worst)
        self.max_rel = max(self.max_rel, worst / max(scale, 1e-30))
        self.ok = self.ok and worst <= self.atol + self.rtol * scale

    def _fail(self, why: str) -> None:
        self.ok = False
        self.max_abs = self.max_rel = float("inf")
        self.mismatch = self.mismatch or why


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
) -> VerifyReport:
    """Compare the ONNX file at `path` with `reference` (put in eval mode for the call) on random inputs.

    Every output tensor is compared: the ONNX outputs in order against the PyTorch outputs flattened by
    :func:`brn_cli.nn.outputs.flat_outputs`; a different count or shape fails the check and says so in
    ``mismatch``. `batches` defaults to (1, max(2, input_shape[0])). Inputs are drawn in the reference
    model's dtype and cast to the ONNX input's dtype (an fp16 export is compared against the fp32 reference).
    `image_list`: the model takes a list of 3-D images (a torchvision detector) and the graph one input per
    image, so its batch is fixed: only ``input_shape[0]`` is checked.
    """
    report = VerifyReport(atol=atol, rtol=rtol)
    if batches is None:
        batches = [int(input_shape[0])] if image_list else [1, max(2, int(input_shape[0]))]
    providers = list(providers) if providers is not None else ort_providers()
    was_training = reference.training
    reference.eval()
    try:
        dtype = _model_dtype(reference)
        data = {b: _inputs(input_shape, b, inputs_per_batch, seed, dtype, image_list) for b in batches}
        expected = {b: [_outputs(reference, x, image_list) for x in xs] for b, xs in data.items()}
    finally:
        reference.train(was_training)
    for provider in providers:
        for level in optimization_levels:
            sess = _session(path, provider, level)
            for b in batches:
                tally = _Tally(atol=atol, rtol=rtol, classifier=not image_list)
                for x, want in zip(data[b], expected[b], strict=True):
                    tally.add(sess.run(None, _feed(sess, x, image_list)), want)
                report.checks.append(
                    VerifyCheck(
                        provider=provider.replace("ExecutionProvider", ""),
                        optimization=level,
                        batch=b,
                        inputs=len(data[b]),
                        max_abs=tally.max_abs,
                        max_rel=tally.max_rel,
                        top1=tally.agree / tally.rows if tally.rows else None,
                        passed=tally.ok,
                        mismatch=tally.mismatch,
                    )
                )
    return report


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
