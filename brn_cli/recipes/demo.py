"""`brn demo`: the whole story on the bundled sample, in one command and a couple of minutes on a CPU.

The flow is the one a user follows with their own model, with the bundled MNIST digits standing in:

1. **pretrain** -- the "existing model": a small ResNet trained with plain BatchNorm on i.i.d. batches
   (:func:`brn_cli.recipes.pretrain.pretrain_batchnorm`), saved as a plain ``state_dict``;
2. **inspect** -- its normalization layers and where each would fold (:func:`brn_cli.deploy.inspection.inspect_model`);
3. **convert** -- BatchNorm -> Batch Renorm, checking that eval outputs did not move
   (:func:`brn_cli.nn.convert.convert_batchnorm`);
4. **fine-tune twice** on non-i.i.d. batches (``grouped:K``: batch/K labels, K examples of each -- the paper's
   section 4.3), same seed, same data order, same learning rate; once with the schedule ``off`` (rmax = 1,
   dmax = 0 throughout: exactly BatchNorm) and once with ``paper-scaled`` (Batch Renorm, the paper's
   schedule shrunk to the run length) -- :func:`brn_cli.train.finetune.run_finetune`;
5. **evaluate** both final models in inference mode (moving averages: what a deployed model does) and with
   batch statistics on test batches composed like the training ones (what the training loss saw);
6. **export** both to ONNX, folded and verified against PyTorch in onnxruntime, and measure the ONNX
   models' accuracy on the validation digits;
7. a comparison table (``summary.json``) and one PNG with both runs' curves (``curves.png``).

Why grouped batches show the difference: with batch/K labels per batch, the minibatch mean and variance
carry information about which labels are in the batch. BatchNorm trains a function of the whole batch and is
then evaluated as a function of one example (the moving averages), so training and inference disagree.
Batch Renorm's r and d correct the batch statistics towards the moving averages, so the function trained is
the function used at inference (section 3 of the paper).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from brn_cli.errors import BrnError
from brn_cli.progress import Progress
from brn_cli.storage.atomic import ensure_output_dir

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

ARCH_SPEC = "brn_cli.samples.models:small_resnet"
# The pretraining standardises pixels with these (brn_cli.recipes.pretrain); fine-tuning must see the same.
NORMALIZE = "0.1314,0.3087"
METHODS = {"batchnorm": "off", "renorm": "paper-scaled"}
# Everything the demo writes into its folder (so --force removes exactly these and nothing else).
DEMO_FILES = (
    "bn_model.pt",
    "brn_model.pt",
    "batchnorm",
    "renorm",
    "batchnorm.onnx",
    "renorm.onnx",
    "curves.png",
    "summary.json",
)


@dataclass
class DemoConfig:
    """Options of `brn demo`. The defaults are the measured configuration of docs/results.md."""

    output: str = "brn-demo"
    device: str = "auto"
    threads: int | None = None  # None: DEFAULT_THREADS
    pretrain_steps: int = 300
    steps: int = 400  # fine-tuning steps per run
    batch_size: int = 32
    sampler: str = "grouped:32"  # every batch holds one label: the strongest non-i.i.d. case
    lr: float = 0.02
    seed: int = 0
    force: bool = False

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A seconds-long run of the same flow (for tests and a first look): far too short to compare."""
        return cls(**{"pretrain_steps": 30, "steps": 16, **overrides})


@dataclass
class RunSummary:
    """One fine-tuning run's final model, evaluated three ways."""

    method: str  # "batchnorm" or "renorm"
    schedule: str
    run_dir: str
    steps: int
    seconds: float
    inference_accuracy: float  # PyTorch, eval mode (moving averages)
    batch_stats_accuracy: float  # PyTorch, minibatch statistics on grouped test batches
    train_accuracy: float | None  # last logging window, training mode
    onnx_file: str
    onnx_max_abs: float  # verification: max |onnx - torch| over random inputs
    onnx_passed: bool
    onnx_accuracy: float  # onnxruntime on the validation digits
    folded: int


@dataclass
class DemoResult:
    output: str
    config: dict[str, Any]
    pretrain: dict[str, Any]
    inspect: dict[str, Any]
    convert: dict[str, Any]
    runs: dict[str, RunSummary] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "config": self.config,
            "threads": self.threads,
            "seconds": self.seconds,
            "pretrain": self.pretrain,
            "inspect": self.inspect,
            "convert": self.convert,
            "runs": {k: asdict(v) for k, v in self.runs.items()},
            "files": self.files,
        }


# One torch thread unless asked for more. The demo's model is small (78k parameters, batches of 32), so a
# second thread gains little on a quiet machine, while on a busy shared one the OpenMP threads wait for each
# other: the full demo took 128-175 s with 2 threads on a loaded 2-core machine against 28 s with 1, and
# `--quick` 22-30 s against 15-17 s (load average 2-4.5).
DEFAULT_THREADS = 1


def prepare_output(output: str, force: bool, files: Sequence[str]) -> Path:
    """The demo's folder `output`, created if need be. A folder holding anything is refused unless `force`,
    and then only `files` (what a previous run of that demo wrote) are removed from it."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise BrnError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BrnError(
                f"output folder {out} is not empty; pass `force=True` to overwrite the demo's files there"
            )
        for name in files:  # only what a previous demo wrote
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return ensure_output_dir(out)


def start(config: Any, files: Sequence[str]) -> tuple[Path, float, int, Any]:
    """(output folder, start time, torch threads, device) of a demo run whose `config` is validated: the
    folder prepared (:func:`prepare_output`), the threads set, the device resolved."""
    out = prepare_output(config.output, config.force, files)
    t0 = time.perf_counter()
    from brn_cli.nn.device import resolve_device, set_threads

    threads = set_threads(DEFAULT_THREADS if config.threads is None else config.threads)
    return out, t0, threads, resolve_device(config.device)


def _validate(config: DemoConfig) -> None:
    from brn_cli.data.samplers import parse_sampler

    if config.pretrain_steps < 1:
        raise BrnError(f"`pretrain_steps` must be >= 1, got {config.pretrain_steps}")
    if config.steps < 1:
        raise BrnError(f"`steps` must be >= 1, got {config.steps}")
    if config.batch_size < 2:
        raise BrnError(f"`batch_size` must be >= 2, got {config.batch_size}")
    if not config.lr > 0:
        raise BrnError(f"`lr` must be > 0, got {config.lr}")
    parse_sampler(config.sampler)
    if config.threads is not None and config.threads < 1:
        raise BrnError(f"`threads` must be >= 1, got {config.threads}")


def _labels_per_batch(config: DemoConfig) -> str:
    if ":" not in config.sampler:
        return "all labels"
    n = config.batch_size // int(config.sampler.split(":")[1])
    return f"{n} label" + ("s" if n != 1 else "")


def _onnx_accuracy(path: Path, x, y) -> float:
    """Top-1 accuracy of an ONNX classifier on (x, y) with onnxruntime's CPU provider."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = 0
    xs = x.numpy().astype(np.float32)
    ys = y.numpy()
    for start in range(0, len(xs), 250):
        logits = sess.run(None, {name: xs[start : start + 250]})[0]
        correct += int((logits.argmax(1) == ys[start : start + 250]).sum())
    return correct / len(xs)


def run_demo(
    config: DemoConfig,
    *,
    stage: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> DemoResult:
    """Run the demo flow (module docstring) into `config.output`; returns every number it printed.

    `stage(title)` is called as each stage starts, `note(text)` with the key numbers of each stage (the
    CLI prints them; the library prints nothing itself). `progress` hears of the pretraining and of each
    fine-tuning run.
    """
    from brn_cli.samples import SAMPLE_DATA

    stage = stage or (lambda _t: None)
    note = note or (lambda _t: None)
    _validate(config)
    out, t0, threads, device = start(config, DEMO_FILES)

    stage("1/6  the existing model: small ResNet trained with BatchNorm on i.i.d. batches")
    pre, bn_path = _pretrain(config, out, device, progress, note)
    stage("2/6  inspect")
    ckpt, inspected = _inspect(bn_path, note)
    stage("3/6  convert BatchNorm -> Batch Renorm")
    brn_path, converted = convert_and_save(ckpt, [8, 1, 28, 28], out / "brn_model.pt", note)
    stage(
        f"4/6  fine-tune {config.steps} steps on non-i.i.d. batches ({config.sampler}: "
        f"{_labels_per_batch(config)} per batch of {config.batch_size}), batchnorm vs renorm"
    )
    every = max(config.steps // 8, min(25, config.steps))  # 8 evaluations, not a flood
    runs = finetune_each(config, brn_path, SAMPLE_DATA, out, device, progress, note, _told, eval_every=every)
    stage("5/6  evaluate the final models: inference mode and batch statistics")
    data, finals, evals = _evaluate_finals(config, runs, device, note)
    stage("6/6  export to ONNX (folded), verify in onnxruntime")
    result = DemoResult(
        output=str(out),
        config=asdict(config),
        pretrain={k: v for k, v in pre.items() if k != "device"},
        inspect=inspected,
        convert=converted,
        threads=threads,
    )
    result.runs = _export_finals(finals, runs, evals, data, out, note)
    _plot_curves(config, runs, out)
    result.seconds = time.perf_counter() - t0
    _write_summary(result, out)
    return result


def _pretrain(
    config: DemoConfig, out: Path, device: Any, progress: Progress | None, note: Callable[[str], None]
) -> tuple[dict[str, Any], Path]:
    """Stage 1, the user's existing model: pretrain with BatchNorm, save it as a plain state_dict."""
    from brn_cli.recipes.pretrain import pretrain_batchnorm

    model, pre = pretrain_batchnorm(
        "small_resnet", steps=config.pretrain_steps, seed=config.seed, device=device, progress=progress
    )
    bn_path = save_state_dict(model, out / "bn_model.pt")
    note(
        f"{config.pretrain_steps} steps of batch 32 in {pre['seconds']:.1f} s: validation accuracy "
        f"{100 * pre['val_accuracy']:.1f}% (inference mode) -> {bn_path}"
    )
    return pre, bn_path


def _inspect(bn_path: Path, note: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """Stage 2: load the state_dict with the sample arch and inspect its norm layers. Returns the loaded
    checkpoint and the summary's ``inspect`` figures."""
    from brn_cli.deploy.inspection import inspect_model
    from brn_cli.storage.checkpoint import load_checkpoint

    ckpt = load_checkpoint(bn_path, arch=ARCH_SPEC)
    report = inspect_model(ckpt, [2, 1, 28, 28])
    foldable = sum(1 for n in report.norms if n.fold_into)
    healthy = sum(1 for n in report.norms if n.health == "ok")
    note(
        f"{report.parameters:,} parameters; {len(report.norms)} BatchNorm2d layers, {foldable} foldable into "
        f"their convs, {healthy} with healthy running statistics"
    )
    return ckpt, {"parameters": report.parameters, "norms": len(report.norms), "foldable": foldable}


def save_state_dict(model: Any, path: Path) -> Path:
    """Save `model` as the user's existing checkpoint would be: a plain state_dict, on the CPU."""
    import torch

    from brn_cli.storage.atomic import write_atomic

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: torch.save(state, tmp), force=True)
    return path


def convert_and_save(
    ckpt: Any, check_shape: list[int], brn_path: Path, note: Callable[[str], None]
) -> tuple[Path, dict[str, Any]]:
    """BatchNorm -> Batch Renorm, checked on a batch of `check_shape` to leave eval outputs unchanged, saved
    as a brn checkpoint at `brn_path`. Returns its path and the summary's ``convert`` figures."""
    from brn_cli.nn.convert import convert_checked
    from brn_cli.nn.norms import renorm_layers
    from brn_cli.storage.checkpoint import save_brn_checkpoint

    checked = convert_checked(ckpt.model, input_shape=check_shape, momentum=0.01)
    converted, diff = checked.model, checked.max_abs_diff
    save_brn_checkpoint(
        converted,
        brn_path,
        force=True,
        input_shape=[2, 1, 28, 28],
        command="demo",
        **{**ckpt.lineage(), "preprocessing": {"normalize": NORMALIZE}},
    )
    n_renorm = len(renorm_layers(converted))
    note(f"{n_renorm} layers converted; eval outputs max |before - after| = {diff:.2g} -> {brn_path}")
    return brn_path, {"layers": n_renorm, "max_abs_diff": diff}


def _told(method: str, schedule: str, res: Any) -> str:
    """Stage 4's line on one finished fine-tuning run."""
    f = res.final
    return (
        f"{method:9s} (schedule {schedule}): final rmax {f['rmax']:.3g}, dmax {f['dmax']:.3g}; "
        f"validation {100 * (f['val_accuracy'] or 0):.1f}% in {res.seconds:.1f} s"
    )


def finetune_each(
    config: Any,
    brn_path: Path,
    data: Path,
    out: Path,
    device: Any,
    progress: Progress | None,
    note: Callable[[str], None],
    told: Callable[[str, str, Any], str],
    **options: Any,
) -> dict[str, Any]:
    """One fine-tuning run of `brn_path` on `data` per method of :data:`METHODS`, into ``out/METHOD``: the
    same seed, data order and rate (`config`'s steps, batch size, lr, sampler, seed), only the renorm
    schedule differs; `options` are further FinetuneConfig fields. After each run, `note` hears
    ``told(method, schedule, result)``. Returns each method's FinetuneResult."""
    from brn_cli.train.finetune import FinetuneConfig, run_finetune

    runs: dict[str, Any] = {}
    for method, schedule in METHODS.items():
        ft = FinetuneConfig(
            checkpoint=str(brn_path),
            data=str(data),
            output=str(out / method),
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            rmax_schedule=schedule,
            sampler=config.sampler,
            normalize=NORMALIZE,
            seed=config.seed,
            device=str(device),
            force=True,
            **options,
        )
        runs[method] = run_finetune(ft, progress=progress)
        note(told(method, schedule, runs[method]))
    return runs


def _evaluate_finals(
    config: DemoConfig, runs: dict[str, Any], device: Any, note: Callable[[str], None]
) -> tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]:
    """Stage 5: each run's last model in inference mode and with batch statistics on test batches composed
    like the training ones. Returns the sample data, the final models and their evaluations."""
    from brn_cli.data.datasets import load_data
    from brn_cli.evaluation.evaluate import evaluate_data
    from brn_cli.samples import SAMPLE_DATA
    from brn_cli.storage.checkpoint import load_checkpoint

    data = load_data(SAMPLE_DATA, normalize=NORMALIZE, seed=config.seed)
    finals: dict[str, Any] = {}
    evals: dict[str, dict[str, Any]] = {}
    for method, res in runs.items():
        loaded = load_checkpoint(Path(res.run_dir) / "last.pt")
        finals[method] = loaded.model
        evals[method] = evaluate_data(
            loaded.model,
            data,
            batch_size=config.batch_size,
            batch_stats=True,
            sampler=config.sampler,
            seed=config.seed,
            device=device,
        )
        e = evals[method]
        note(
            f"{method:9s}: inference {100 * e['inference']['accuracy']:.1f}%, batch statistics "
            f"({config.sampler} test batches) {100 * e['batch_stats']['accuracy']:.1f}%"
        )
    return data, finals, evals


def _export_finals(
    finals: dict[str, Any],
    runs: dict[str, Any],
    evals: dict[str, dict[str, Any]],
    data: Any,
    out: Path,
    note: Callable[[str], None],
) -> dict[str, RunSummary]:
    """Stage 6: export each final model to folded ONNX (verified in onnxruntime), score the ONNX model on
    the validation digits, and sum up each run."""
    import torch

    from brn_cli.deploy.export import export_onnx_checked

    x_val = torch.stack([data.val[i][0] for i in range(len(data.val))])
    summaries: dict[str, RunSummary] = {}
    for method, model in finals.items():
        onnx_path = out / f"{method}.onnx"
        rep = export_onnx_checked(model.cpu().eval(), [2, 1, 28, 28], onnx_path, force=True)
        onnx_acc = _onnx_accuracy(onnx_path, x_val, data.val_labels)
        res = runs[method]
        folded = len(rep.fold.folded) if rep.fold is not None else 0
        summaries[method] = RunSummary(
            method=method,
            schedule=METHODS[method],
            run_dir=res.run_dir,
            steps=res.steps,
            seconds=res.seconds,
            inference_accuracy=evals[method]["inference"]["accuracy"],
            batch_stats_accuracy=evals[method]["batch_stats"]["accuracy"],
            train_accuracy=res.final.get("train_accuracy"),
            onnx_file=str(onnx_path),
            onnx_max_abs=rep.verify.max_abs,
            onnx_passed=rep.verify.passed,
            onnx_accuracy=onnx_acc,
            folded=folded,
        )
        note(
            f"{method:9s}: {folded} norms folded, "
            f"{len(rep.verify.checks)} onnxruntime checks passed, max |onnx - torch| "
            f"{rep.verify.max_abs:.2g}; ONNX accuracy {100 * onnx_acc:.1f}% -> {onnx_path}"
        )
    return summaries


def _plot_curves(config: DemoConfig, runs: dict[str, Any], out: Path) -> None:
    from brn_cli.train.curves import plot_runs

    with contextlib.suppress(ValueError):  # nothing logged: no figure
        plot_runs(
            {m: Path(r.run_dir) / "metrics.jsonl" for m, r in runs.items()},
            out / "curves.png",
            title=f"fine-tuning on {config.sampler} batches: batchnorm (schedule off) vs renorm (paper-scaled)",
        )


def _write_summary(result: DemoResult, out: Path) -> None:
    """List the folder's files in `result` (summary.json among them) and write it as summary.json."""
    result.files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if "summary.json" not in result.files:
        result.files = sorted([*result.files, "summary.json"])
    write_summary(result.to_dict(), out)


def write_summary(summary: dict[str, Any], out: Path) -> None:
    """`summary` as ``out/summary.json`` (indented JSON), written atomically."""
    from brn_cli.storage.atomic import write_atomic

    text = json.dumps(summary, indent=2) + "\n"
    write_atomic(out / "summary.json", lambda tmp: tmp.write_text(text, encoding="utf-8"), force=True)
