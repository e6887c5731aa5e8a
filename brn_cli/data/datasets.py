"""Datasets and batch composition for fine-tuning, evaluation and calibration.

Data specs (:func:`load_data`):
  * an ``.npz`` with ``x_train``, ``y_train`` and optionally ``x_val``, ``y_val``. Integer pixels of any
    dtype are 8-bit values: with every value in 0..255 they become float32 in [0, 1] (/255); any other
    integer range (16-bit images, negative values) is refused, since no divisor is right for every such
    array (a 12-bit image in uint16 is not /65535). Float arrays are used as they are. Layout NCHW, NHWC
    (detected when the last axis has 1, 3 or 4 entries and axis 1 does not), N x H x W (one channel added)
    or flat N x F features. Labels: integer (or whole float) class indices >= 0. Object arrays are refused:
    nothing is ever unpickled;
  * an ImageFolder-layout directory with ``train/`` and ``val/`` subfolders (torchvision ImageFolder;
    ToTensor). Images load as RGB, or grayscale with ``channels=1``; left unset, the
    channels follow the first convolution of the model (:func:`fit_data_to_model`). ``image_size=S`` resizes each image's shorter side to ``resize_size=R`` (default
    round(S / 0.875), torchvision's 224 -> 256) and center-crops S x S, as torchvision's classification
    presets do at evaluation; the same deterministic transform serves training (no augmentation, so a run
    replays exactly). Without it every image is resized to the first training image's size, so folders of
    mixed sizes still batch;
  * ``package.module:callable`` returning ``(train_dataset, val_dataset)`` (val may be None).

``augment="flip"`` or ``"crop-flip"`` (fine-tuning only) randomly transforms the training images, never the validation
ones (:class:`AugmentedDataset`): a horizontal flip with probability 1/2, after a random resized crop for
``crop-flip``. Each example draws from its own generator seeded by (seed, epoch, index), so the augmentation
does not depend on worker processes or on where a run was resumed.

``normalize="MEAN,STD"`` (or M1,M2,M3,S1,S2,S3 per channel) maps x -> (x - mean) / std after the [0, 1]
scaling. ``val_split=F`` holds out a seeded, stratified fraction F of train when there is no validation
set.

Batch composition follows the paper's section 4.3 (:class:`LabelBatchSampler`): ``iid`` is a seeded
permutation per epoch; ``grouped:K`` builds each batch from batch/K distinct labels with K examples each,
the non-i.i.d. minibatches under which batchnorm's train/inference gap shows and Batch Renorm removes it.
Each step draws one GLOBAL batch (batch_size x num_replicas) and rank r takes its slice, so the data order
depends only on the seed, the epoch and the global batch size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from brn_cli.data.augment import AugmentedDataset, parse_augment
from brn_cli.data.base import (
    ArrayDataset,
    DataBundle,
    DataFileError,
    ImageReader,
    _check_normalize_channels,
    _held_out,
    _normalize_tensor,
    _read_npz_pairs,
    _Subset,
    _to_float_images,
)
from brn_cli.data.specs import (
    IMAGE_CHANNELS,
    check_data_spec,
    check_task,
    default_resize_size,
    parse_normalize,
)
from brn_cli.errors import BrnError, first_line

__all__ = [
    "ArrayDataset",
    "DataBundle",
    "DataFileError",
    "dataset_labels",
    "fit_data_to_model",
    "is_image_folder",
    "load_data",
    "model_input_channels",
]


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class _Normalized(Dataset):
    """A view of a dataset whose x is mapped to (x - mean) / std per channel (axis 0 of one example)."""

    def __init__(self, base: Dataset, mean: Tensor, std: Tensor) -> None:
        self.base = base
        self.mean = mean
        self.std = std
        if hasattr(base, "targets"):
            self.targets = base.targets

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, y = self.base[index]
        x = torch.as_tensor(x, dtype=torch.float32)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (x - self.mean.view(shape)) / self.std.view(shape), int(y)


def dataset_labels(dataset: Dataset, what: str = "dataset") -> Tensor:
    """int64 labels of every example: from `.targets` when present, else one pass over the items."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return _check_labels(targets, what)
    return _check_labels([_label_of(dataset[i], what) for i in range(len(dataset))], what)  # type: ignore[arg-type]


def _label_of(item: Any, what: str) -> int:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise BrnError(f"{what}: items must be (x, label) pairs, got {type(item).__name__}")
    return int(item[1])


# The grouped sampler counts examples per label value (bincount): a label is an index, not an arbitrary id.
MAX_LABEL = 2**24 - 1


def _check_labels(labels: Any, what: str) -> Tensor:
    """Labels as int64 [N]: integers, or floats with whole values, all in 0..MAX_LABEL."""
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu()
        values = (labels.float() if labels.dtype == torch.bfloat16 else labels).numpy()
    else:
        values = np.asarray(labels)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise BrnError(f"{what}: labels must be one class index per example, got shape {list(values.shape)}")
    if values.dtype.kind == "f":
        whole = np.isfinite(values) & (values == np.round(values))
        if not whole.all():
            raise BrnError(f"{what}: labels must be whole class indices, got {values[~whole][0]:g}")
    elif values.dtype.kind not in "iu":
        raise BrnError(f"{what}: labels must be integer class indices, got {values.dtype}")
    if values.size:
        low, high = values.min(), values.max()
        if low < 0:
            raise BrnError(f"{what}: label {int(low)} out of range (labels must be >= 0)")
        if high > MAX_LABEL:
            raise BrnError(f"{what}: label {int(high)} out of range (class indices go up to {MAX_LABEL})")
    return torch.from_numpy(values.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _load_npz(path: Path, val_split: float | None, norm, seed: int) -> DataBundle:
    raw = _read_npz_pairs(path)
    has_val = "x_val" in raw
    if has_val and val_split is not None:
        raise BrnError(f"{path} has x_val/y_val already; drop `val_split`")
    x_train = _to_float_images(raw["x_train"], f"{path}: x_train")
    y_train = _check_labels(raw["y_train"], f"{path}: y_train")
    if len(x_train) != len(y_train):
        raise BrnError(f"{path}: x_train has {len(x_train)} examples but y_train has {len(y_train)}")
    if len(x_train) == 0:
        raise BrnError(f"{path}: the training set is empty")
    x_train = _normalize_tensor(x_train, norm, "x_train")
    if has_val:
        x_val = _normalize_tensor(_to_float_images(raw["x_val"], f"{path}: x_val"), norm, "x_val")
        y_val = _check_labels(raw["y_val"], f"{path}: y_val")
        if len(x_val) != len(y_val):
            raise BrnError(f"{path}: x_val has {len(x_val)} examples but y_val has {len(y_val)}")
        if len(x_val) == 0:
            raise BrnError(f"{path}: the validation set is empty")
        if x_val.shape[1:] != x_train.shape[1:]:
            raise BrnError(
                f"{path}: x_val examples have shape {list(x_val.shape[1:])}, "
                f"x_train {list(x_train.shape[1:])}"
            )
    elif (split := _held_out(str(path), False, y_train, val_split, seed)) is not None:
        tr, va = split
        x_val, y_val = x_train.index_select(0, va), y_train.index_select(0, va)
        x_train, y_train = x_train.index_select(0, tr), y_train.index_select(0, tr)
    else:
        x_val = y_val = None
    num_classes = _num_classes(y_train, y_val, str(path))
    train = ArrayDataset(x_train, y_train)
    val = ArrayDataset(x_val, y_val) if x_val is not None else None
    desc = f"{path.name}: {len(train)} train" + (f" / {len(val)} val" if val is not None else "")
    desc += f", {num_classes} classes, x {list(x_train.shape[1:])}"
    return DataBundle(train, val, y_train, y_val, num_classes, tuple(x_train.shape[1:]), desc, str(path))


def _num_classes(y_train: Tensor, y_val: Tensor | None, source: str) -> int:
    num_classes = int(y_train.max()) + 1
    if y_val is not None and len(y_val) and int(y_val.max()) >= num_classes:
        raise BrnError(
            f"{source}: validation label {int(y_val.max())} out of range: training labels span 0..{num_classes - 1}"
        )
    return num_classes


def _first_x_shape(dataset: Dataset, what: str) -> tuple[int, ...]:
    item = dataset[0]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise BrnError(f"{what}: items must be (x, label) pairs, got {type(item).__name__}")
    return tuple(torch.as_tensor(item[0]).shape)


def _wrap_datasets(
    train: Dataset,
    val: Dataset | None,
    val_split: float | None,
    norm,
    seed: int,
    source: str,
    name: str | None = None,
    images: ImageReader | None = None,
) -> DataBundle:
    """A DataBundle of user datasets; `source` (the spec as given) names the data in errors, `name` in logs."""
    if len(train) == 0:  # type: ignore[arg-type]
        raise BrnError(f"{source}: the training set is empty")
    if val is not None and len(val) == 0:  # type: ignore[arg-type]
        raise BrnError(f"{source}: the validation set is empty")
    y_train = dataset_labels(train, f"{source}: training set")
    if len(y_train) != len(train):  # type: ignore[arg-type]
        raise BrnError(f"{source}: {len(train)} training examples but {len(y_train)} labels")  # type: ignore[arg-type]
    y_val = dataset_labels(val, f"{source}: validation set") if val is not None else None
    split = _held_out(source, val is not None, y_train, val_split, seed)
    if split is not None:
        tr, va = split
        train, val, y_train, y_val = (
            _Subset(train, tr, y_train[tr]),
            _Subset(train, va, y_train[va]),
            y_train[tr],
            y_train[va],
        )
    num_classes = _num_classes(y_train, y_val, source)
    shape = _first_x_shape(train, source)
    if norm is not None:
        channels = shape[0] if shape else 1
        if norm[0].numel() not in (1, channels):
            raise BrnError(f"`normalize` gives {norm[0].numel()} channel values but the data has {channels}")
        train = _Normalized(train, *norm)
        val = _Normalized(val, *norm) if val is not None else None
    desc = f"{name or source}: {len(train)} train" + (f" / {len(val)} val" if val is not None else "")  # type: ignore[arg-type]
    desc += f", {num_classes} classes, x {list(shape)}"
    return DataBundle(train, val, y_train, y_val, num_classes, shape, desc, source, images)


def _image_folder(folder: Path, reader: ImageReader) -> Any:
    from torchvision import datasets

    try:
        return datasets.ImageFolder(str(folder), loader=reader)
    except FileNotFoundError as exc:
        text = first_line(exc, 300)
        if text.startswith("Found no valid file"):  # torchvision: some class folder holds no image
            classes = text.split("for the classes", 1)[-1].split(". Supported", 1)[0].strip()
            raise BrnError(
                f"{folder}: no image files in class folder(s) {classes} "
                "(.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp)"
            ) from None
        raise BrnError(f"{folder}: {text}") from None
    except (OSError, RuntimeError) as exc:
        raise BrnError(f"{folder}: {first_line(exc, 200)}") from None


def _load_image_folder(
    path: Path,
    val_split: float | None,
    norm,
    seed: int,
    image_size: int | None,
    resize_size: int | None,
    channels: int | None,
) -> DataBundle:
    try:
        from torchvision import transforms
    except ImportError:
        raise BrnError("an ImageFolder data directory needs torchvision installed") from None
    train_dir, val_dir = path / "train", path / "val"
    if not train_dir.is_dir():
        raise BrnError(f"{path}: an ImageFolder data directory needs a train/ subfolder (and val/)")
    reader = ImageReader(channels)
    train = _image_folder(train_dir, reader)
    val = _image_folder(val_dir, reader) if val_dir.is_dir() else None
    if val is not None and val.classes != train.classes:
        raise BrnError(f"{path}: train/ and val/ have different class folders")
    _check_normalize_channels(norm, reader.channels)
    reader.normalize = norm
    if image_size is not None:
        resize = resize_size if resize_size is not None else default_resize_size(image_size)
        steps: list[Any] = [transforms.Resize(resize), transforms.CenterCrop(image_size)]
        how = f"shorter side resized to {resize}, center-cropped to {image_size}x{image_size}"
    else:  # every image resized to the first training image's size, so folders of mixed sizes still batch
        width, height = reader(train.samples[0][0]).size
        steps = [transforms.Resize((height, width))]
        how = f"images resized to {height}x{width}"
    steps.append(transforms.ToTensor())
    if norm is not None:
        steps.append(transforms.Normalize(norm[0].tolist(), norm[1].tolist()))
    train.transform = transforms.Compose(steps)
    if val is not None:
        val.transform = train.transform
    # Normalization is in the transform already.
    return _wrap_datasets(train, val, val_split, None, seed, str(path), f"{path.name} ({how})", reader)


def _load_callable(spec: str, val_split: float | None, norm, seed: int) -> DataBundle:
    from brn_cli.storage.checkpoint import import_callable

    result = import_callable(spec, param="data")()
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise BrnError(f"`data` {spec} must return (train_dataset, val_dataset), got {type(result).__name__}")
    train, val = result
    return _wrap_datasets(train, val, val_split, norm, seed, spec)


def is_image_folder(spec: str | os.PathLike) -> bool:
    """Whether a data spec names an ImageFolder-layout directory (the only kind ``image_size`` applies to)."""
    return Path(str(spec)).is_dir()


def load_data(
    spec: str | os.PathLike,
    *,
    val_split: float | None = None,
    normalize: str | None = None,
    seed: int = 0,
    image_size: int | None = None,
    resize_size: int | None = None,
    augment: str = "none",
    channels: int | None = None,
    task: str = "classification",
    ignore_index: int = 255,
    inputs_only: bool = False,
) -> DataBundle:
    """Load a data spec (see the module docstring) into a :class:`DataBundle`. Bad input -> BrnError.

    `channels` (1 or 3) applies to image folders only; None loads RGB until :func:`fit_data_to_model`
    matches the model. `task` "segmentation" reads masks as targets (:mod:`brn_cli.data.segmentation`,
    with `ignore_index`); "embedding" reads class labels as classification does. `inputs_only` never reads
    the targets, whatever the task (:mod:`brn_cli.data.inputs`: every target is 0).
    """
    augment = parse_augment(augment)
    if inputs_only and augment != "none":
        raise BrnError("`augment` applies to training; inputs-only data is never augmented")
    if inputs_only:
        from brn_cli.data.inputs import load_inputs, mask_folder_images

        # An ImageFolder's targets are its class folders, always valid: it is read as for classification.
        if not is_image_folder(spec) or mask_folder_images(spec) is not None:
            options = {"image_size": image_size, "resize_size": resize_size, "channels": channels}
            return load_inputs(spec, val_split=val_split, normalize=normalize, seed=seed, **options)
    task = check_task("classification" if inputs_only else task)
    if task == "segmentation":
        from brn_cli.data.segmentation import load_segmentation

        options = {"image_size": image_size, "resize_size": resize_size, "channels": channels}
        bundle = load_segmentation(spec, val_split, normalize, seed, ignore_index=ignore_index, **options)
    else:
        bundle = _load_data(spec, val_split, normalize, seed, image_size, resize_size, channels)
        bundle.task = task
    if augment != "none":  # the training set only, after any --val-split
        if len(bundle.sample_shape) != 3:
            raise BrnError(
                f"`augment` needs image examples [C, H, W]; this data has shape {list(bundle.sample_shape)}"
            )
        if task == "segmentation":
            from brn_cli.data.masks import PairedAugmentedDataset

            bundle.train = PairedAugmentedDataset(bundle.train, augment, seed, bundle.train_labels)
        else:
            bundle.train = AugmentedDataset(bundle.train, augment, seed, bundle.train_labels)
        bundle.description += f", augmented ({augment})"
    return bundle


def _load_data(
    spec: str | os.PathLike,
    val_split: float | None,
    normalize: str | None,
    seed: int,
    image_size: int | None,
    resize_size: int | None,
    channels: int | None,
) -> DataBundle:
    kind = check_data_spec(
        spec,
        val_split=val_split,
        normalize=normalize,
        image_size=image_size,
        resize_size=resize_size,
        channels=channels,
    )
    norm = parse_normalize(normalize)
    text = str(spec)
    if kind == "npz":
        return _load_npz(Path(text), val_split, norm, seed)
    if kind == "folder":
        return _load_image_folder(Path(text), val_split, norm, seed, image_size, resize_size, channels)
    return _load_callable(text, val_split, norm, seed)


# ----------------------------------------------------------------------------------------------
# Data against the model
# ----------------------------------------------------------------------------------------------


def model_input_channels(model: torch.nn.Module) -> tuple[str, int] | None:
    """(name, in_channels) of the model's first convolution in definition order; None without one."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return name or type(module).__name__, int(module.in_channels)
    return None


def fit_data_to_model(
    model: torch.nn.Module, bundle: DataBundle, *, split: str = "train", labels: bool = True
) -> None:
    """Match image-folder channels to the model and check that the data fits it, before any long run.

    Image folders loaded without ``channels`` take the in_channels of the model's first convolution (1 or
    3; else they stay RGB). Then one inference-mode forward of two examples of `split` ("train" or "val")
    checks that the model takes them: a mismatch is one line naming the data and the model's first layer
    (instead of a failure in the middle of a run). With `labels`, the model's output width must cover the
    labels (every label of the data for "train", which a fine-tuning run also validates on; the validation
    labels for "val"). The model's weights, buffers and training flags are left as they were.
    """
    _adopt_model_channels(model, bundle)
    dataset = bundle.train if split == "train" else bundle.val
    if dataset is None or len(dataset) == 0:  # type: ignore[arg-type]
        return
    output = _probe_forward(model, _first_examples(dataset, bundle.source), bundle)
    if not labels or bundle.task != "classification":  # other tasks check their outputs themselves
        return
    from brn_cli.nn.outputs import model_logits

    width = int(model_logits(output).shape[1])
    used = bundle.train_labels if split == "train" else bundle.val_labels
    classes = bundle.num_classes if split == "train" else int(used.max()) + 1  # type: ignore[union-attr]
    if classes > width:
        raise BrnError(
            f"{bundle.source}: the data has {classes} classes (labels 0..{classes - 1}) "
            f"but the model has {width} outputs"
        )


def _first_examples(dataset: Dataset, source: str, count: int = 2) -> Tensor:
    """The first `count` examples of `dataset` stacked into a float32 batch."""
    try:
        xs = [torch.as_tensor(dataset[i][0], dtype=torch.float32) for i in range(min(count, len(dataset)))]  # type: ignore[arg-type]
        return torch.stack(xs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BrnError(f"{source}: examples must be tensors of one shape ({first_line(exc, 200)})") from None


def _adopt_model_channels(model: torch.nn.Module, bundle: DataBundle) -> None:
    reader = bundle.images
    first = model_input_channels(model)
    if reader is None or reader.given or first is None or first[1] not in IMAGE_CHANNELS:
        return
    wanted = first[1]
    if wanted == reader.channels:
        return
    _check_normalize_channels(
        reader.normalize, wanted, f" (the model's first layer {first[0]} takes {wanted})"
    )
    reader.channels = wanted
    old = list(bundle.sample_shape)
    bundle.sample_shape = (wanted, *bundle.sample_shape[1:])
    bundle.description = bundle.description.replace(f"x {old}", f"x {list(bundle.sample_shape)}")


def _probe_forward(model: torch.nn.Module, x: Tensor, bundle: DataBundle) -> Any:
    """model(x) in inference mode without gradients; a failure names the data and the first layer it reached."""
    reference = next(iter(model.parameters()), None)
    if reference is not None:
        x = x.to(reference.device, reference.dtype if reference.is_floating_point() else x.dtype)
    first: list[tuple[str, torch.nn.Module, tuple[int, ...]]] = []

    def record(name: str):
        def hook(module: torch.nn.Module, args: Any) -> None:
            if not first and args and isinstance(args[0], Tensor):
                first.append((name, module, tuple(args[0].shape)))

        return hook

    handles = [
        module.register_forward_pre_hook(record(name or type(module).__name__))
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))
    ]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise BrnError(_mismatch(bundle, first, exc)) from None
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.train(flag)


def _mismatch(bundle: DataBundle, first: list, exc: Exception) -> str:
    if first:
        name, layer, shape = first[0]
        if (
            isinstance(layer, torch.nn.modules.conv._ConvNd)
            and len(shape) >= 2
            and shape[1] != layer.in_channels
        ):
            hint = ""
            if bundle.images is not None and layer.in_channels in IMAGE_CHANNELS:
                hint = f" (pass `channels={layer.in_channels}`)"
            return (
                f"{bundle.source}: the examples have {shape[1]} channels but the model's first layer ({name}) "
                f"takes {layer.in_channels}{hint}"
            )
        if isinstance(layer, torch.nn.Linear) and shape and shape[-1] != layer.in_features:
            return (
                f"{bundle.source}: the examples have {shape[-1]} features but the model's first layer ({name}) "
                f"takes {layer.in_features}"
            )
    return (
        f"{bundle.source}: the model cannot run on examples of shape {list(bundle.sample_shape)} "
        f"({type(exc).__name__}: {first_line(exc, 200)})"
    )


# ----------------------------------------------------------------------------------------------
# Batch composition
# ----------------------------------------------------------------------------------------------
