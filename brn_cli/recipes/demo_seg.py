"""`brn demo --task segmentation`: batchnorm vs renorm on a dense task, at batch 2, on the bundled digits.

The data is the digits segmentation set (:mod:`brn_cli.samples.segmentation`: each ink pixel labelled with
its digit's class + 1, background 0; 11 classes), written into the demo's folder as ``digits-seg.npz``. The
flow mirrors the classification demo's:

1. **pretrain** -- the "existing model": the small UNet sample trained with plain BatchNorm on i.i.d.
   batches of 16 (per-pixel cross-entropy, SGD), saved as a plain ``state_dict``;
2. **convert** -- BatchNorm -> Batch Renorm, checking that eval outputs did not move;
3. **fine-tune twice** at batch 2 (``grouped:2`` by default: both examples of a batch are the same digit),
   same seed, data order and rate; schedule ``off`` (exactly BatchNorm) and ``paper-scaled`` (Batch Renorm);
4. **evaluate** both final models' mean IoU and pixel accuracy in inference mode (moving averages, what a
   deployed model does) and with batch statistics on validation batches composed like the training ones.

``summary.json`` holds every number; nothing is claimed beyond what was measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from brn_cli.errors import BrnError
from brn_cli.progress import Progress
from brn_cli.recipes.demo import (
    METHODS,
    NORMALIZE,
    convert_and_save,
    finetune_each,
    save_state_dict,
    start,
    write_summary,
)

__all__ = ["SegDemoConfig", "SegDemoResult", "run_seg_demo", "write_sample_data"]

ARCH_SPEC = "brn_cli.samples.models:small_unet"
SEG_DEMO_FILES = ("digits-seg.npz", "bn_unet.pt", "brn_unet.pt", "batchnorm", "renorm", "summary.json")


@dataclass
class SegDemoConfig:
    """Options of `brn demo --task segmentation`."""

    output: str = "brn-demo-seg"
    device: str = "auto"
    threads: int | None = None  # None: one thread
    pretrain_steps: int = 200
    pretrain_batch_size: int = 16
    steps: int = 300  # fine-tuning steps per run
    batch_size: int = 2
    sampler: str = "grouped:2"
    lr: float = 0.01
    width: int = 16
    seed: int = 0
    force: bool = False

    @classmethod
    def quick(cls, **overrides: Any) -> SegDemoConfig:
        """A seconds-long run of the same flow (tests, a first look): far too short to compare."""
        return cls(**{"pretrain_steps": 20, "steps": 12, "width": 8, **overrides})


@dataclass
class SegDemoResult:
    output: str
    config: dict[str, Any]
    pretrain: dict[str, Any]
    convert: dict[str, Any]
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_sample_data(
    output: str | Path, task: str = "classification", *, force: bool = False, compress: bool = True
) -> Path:
    """Write the bundled digits (classification) or the digits segmentation set as an .npz at `output` (a
    file, or an existing folder: then ``digits.npz`` / ``digits-seg.npz`` in it). Returns the file written."""
    import shutil

    import numpy as np

    from brn_cli.samples import SAMPLE_DATA
    from brn_cli.samples.segmentation import DIGIT_SEG_FILE, digits_segmentation_arrays
    from brn_cli.storage.atomic import check_writable, write_atomic

    if task not in ("classification", "segmentation", "embedding"):
        raise BrnError(f"`task` {task!r}: expected classification, segmentation or embedding")
    path = Path(output)
    if path.is_dir():
        path = path / (DIGIT_SEG_FILE if task == "segmentation" else "digits.npz")
    check_writable(path, force=force)
    if task != "segmentation":  # embedding learns from the same labelled digits
        write_atomic(path, lambda tmp: shutil.copyfile(SAMPLE_DATA, tmp), force=force)
        return path
    arrays = digits_segmentation_arrays()

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: numpy would append .npz to a path without it
            (np.savez_compressed if compress else np.savez)(fh, **arrays)

    write_atomic(path, save, force=force)
    return path


def _validate(config: SegDemoConfig) -> None:
    from brn_cli.data.samplers import parse_sampler

    for name in ("pretrain_steps", "steps", "width"):
        if getattr(config, name) < 1:
            raise BrnError(f"`{name}` must be >= 1, got {getattr(config, name)}")
    for name in ("batch_size", "pretrain_batch_size"):
        if getattr(config, name) < 2:
            raise BrnError(f"`{name}` must be >= 2 (BatchNorm needs 2 samples), got {getattr(config, name)}")
    if not config.lr > 0:
        raise BrnError(f"`lr` must be > 0, got {config.lr}")
    parse_sampler(config.sampler)


def run_seg_demo(
    config: SegDemoConfig,
    *,
    stage: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> SegDemoResult:
    """Run the segmentation demo (module docstring) into `config.output`; returns every number measured."""
    stage = stage or (lambda _t: None)
    note = note or (lambda _t: None)
    _validate(config)
    out, t0, _, device = start(config, SEG_DEMO_FILES)
    data_path = write_sample_data(out, "segmentation", force=True, compress=False)
    stage(
        f"1/4  the existing model: small UNet trained with BatchNorm on i.i.d. batches of {config.pretrain_batch_size}"
    )
    pre, bn_path = _pretrain(config, data_path, out, device, note)
    stage("2/4  convert BatchNorm -> Batch Renorm")
    brn_path, converted = _convert(bn_path, out, config, note)
    stage(
        f"3/4  fine-tune {config.steps} steps at batch {config.batch_size} ({config.sampler}), batchnorm vs renorm"
    )
    ft = {"task": "segmentation", "eval_every": config.steps}
    runs = finetune_each(config, brn_path, data_path, out, device, progress, note, _told, **ft)
    stage("4/4  evaluate: mean IoU in inference mode and with batch statistics")
    result = SegDemoResult(str(out), asdict(config), pre, converted)
    result.runs = _evaluate_finals(config, runs, data_path, device, note)
    result.seconds = time.perf_counter() - t0
    write_summary(result.to_dict(), out)
    return result


def _pretrain(
    config: SegDemoConfig, data_path: Path, out: Path, device: Any, note: Callable[[str], None]
) -> tuple[dict[str, Any], Path]:
    """Stage 1: plain BatchNorm UNet, i.i.d. batches, per-pixel cross-entropy; saved as a state_dict."""
    import torch
    import torch.nn.functional as F

    from brn_cli.data.datasets import load_data
    from brn_cli.samples.models import small_unet

    data = load_data(data_path, normalize=NORMALIZE, task="segmentation")
    x, masks = data.train.x.to(device), data.train.y.to(device)
    torch.manual_seed(config.seed)
    model = small_unet(num_classes=data.num_classes, width=config.width).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    for step in range(config.pretrain_steps):
        idx = torch.randint(0, len(x), (config.pretrain_batch_size,), generator=gen).to(device)
        loss = F.cross_entropy(model(x[idx]), masks[idx], ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # linear decay to zero, as the classification pretraining
            group["lr"] = 0.05 * (1 - (step + 1) / config.pretrain_steps)
        optimizer.step()
    seconds = time.perf_counter() - t0
    bn_path = save_state_dict(model, out / "bn_unet.pt")
    note(
        f"{config.pretrain_steps} steps in {seconds:.1f} s, last batch loss {float(loss.detach()):.3f} -> {bn_path}"
    )
    return {
        "steps": config.pretrain_steps,
        "seconds": seconds,
        "final_batch_loss": float(loss.detach()),
    }, bn_path


def _convert(
    bn_path: Path, out: Path, config: SegDemoConfig, note: Callable[[str], None]
) -> tuple[Path, dict[str, Any]]:
    """Stage 2: BatchNorm -> Batch Renorm (eval outputs unchanged), saved as a brn checkpoint."""
    from brn_cli.samples.segmentation import DIGIT_SEG_CLASSES
    from brn_cli.storage.checkpoint import load_checkpoint

    kwargs = {"num_classes": DIGIT_SEG_CLASSES, "width": config.width}
    ckpt = load_checkpoint(bn_path, arch=ARCH_SPEC, arch_kwargs=kwargs)
    return convert_and_save(ckpt, [4, 1, 28, 28], out / "brn_unet.pt", note)


def _told(method: str, schedule: str, res: Any) -> str:
    """Stage 3's line on one finished fine-tuning run."""
    return f"{method:9s} (schedule {schedule}): {res.steps} steps in {res.seconds:.1f} s"


def _evaluate_finals(
    config: SegDemoConfig, runs: dict[str, Any], data_path: Path, device: Any, note: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Stage 4: each final model's segmentation metrics, inference mode and batch statistics."""
    from brn_cli.data.datasets import load_data
    from brn_cli.data.samplers import LabelBatchSampler, make_loader
    from brn_cli.evaluation.evaluate import evaluate, evaluate_data
    from brn_cli.storage.checkpoint import load_checkpoint
    from brn_cli.tasks import make_task

    data = load_data(data_path, normalize=NORMALIZE, seed=config.seed, task="segmentation")
    summaries: dict[str, dict[str, Any]] = {}
    for method, res in runs.items():
        model = load_checkpoint(Path(res.run_dir) / "last.pt").model
        task = make_task("segmentation")
        # Inference mode does not depend on the batch: large batches; batch statistics at the training batch.
        e = evaluate_data(model, data, batch_size=250, device=device, task=task)
        batches = LabelBatchSampler(data.val_labels, config.batch_size, config.sampler, seed=config.seed)
        with_stats = evaluate(
            model, make_loader(data.val, batches), task=task, device=device, batch_stats=True
        )
        inference, stats = e["inference"]["metrics"], with_stats.metrics
        summaries[method] = {
            "schedule": METHODS[method],
            "run_dir": res.run_dir,
            "steps": res.steps,
            "seconds": res.seconds,
            "inference_mean_iou": inference["mean_iou"],
            "inference_pixel_accuracy": inference["pixel_accuracy"],
            "batch_stats_mean_iou": stats["mean_iou"],
            "batch_stats_pixel_accuracy": stats["pixel_accuracy"],
        }
        note(
            f"{method:9s}: mean IoU {100 * inference['mean_iou']:.1f}% in inference mode, "
            f"{100 * stats['mean_iou']:.1f}% with batch statistics ({config.sampler} batches)"
        )
    return summaries
