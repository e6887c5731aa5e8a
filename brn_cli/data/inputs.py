"""Inputs only, for the commands that never use targets (calibration): ``load_data(..., inputs_only=True)``.

An ``.npz`` needs ``x_train`` alone (``x_val`` optional); any ``y_train`` / ``y_val`` is not read, so class
labels, masks or anything else may be there. A segmentation folder (``images/`` beside ``masks/``, or under
``train/`` and ``val/``) gives its images alone, sized as :mod:`brn_cli.data.segmentation` sizes them (an
ImageFolder of class folders is read by :func:`brn_cli.data.datasets.load_data` as usual: its targets are
its folders, always valid). A ``package.module:callable``'s datasets may yield
``(x, anything)`` or bare ``x``. Every example's target is a dummy 0, so the bundle feeds the samplers and
loaders as any other; ``val_split`` holds out a seeded random fraction (there are no labels to stratify by).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from brn_cli.data.base import (
    ArrayDataset,
    DataBundle,
    ImageReader,
    _check_normalize_channels,
    _normalize_tensor,
    _open_npz,
    _read_npz_array,
    _Subset,
    _to_float_images,
)
from brn_cli.data.specs import check_data_spec, default_resize_size, parse_normalize
from brn_cli.errors import BrnError, first_line

__all__ = ["ImageFiles", "InputsDataset", "load_inputs", "mask_folder_images"]


class InputsDataset(Dataset):
    """The x of another dataset's items (``(x, ...)`` or a bare x) as float32, normalized, target 0."""

    def __init__(self, base: Dataset, source: str, norm: tuple[Tensor, Tensor] | None = None) -> None:
        self.base = base
        self.source = source
        self.norm = norm

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        item = self.base[index]
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        try:
            x = torch.as_tensor(x, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BrnError(
                f"{self.source}: example {index} is not a tensor ({first_line(exc, 150)})"
            ) from None
        if self.norm is not None:
            shape = (-1,) + (1,) * (x.dim() - 1)
            x = (x - self.norm[0].view(shape)) / self.norm[1].view(shape)
        return x, 0


def load_inputs(
    spec: str | os.PathLike,
    *,
    val_split: float | None = None,
    normalize: str | None = None,
    seed: int = 0,
    **image_options: Any,
) -> DataBundle:
    """A :class:`DataBundle` of the inputs of an .npz, a folder of images/ and masks/, or a callable; targets
    are never read (module docstring). `image_options` (image_size, resize_size, channels) apply to folders."""
    kind = check_data_spec(spec, val_split=val_split, normalize=normalize, **image_options)
    norm = parse_normalize(normalize)
    text = str(spec)
    images = None
    if kind == "npz":
        train, val = _npz_inputs(Path(text), norm)
    elif kind == "callable":
        train, val = _callable_inputs(text, norm)
    elif mask_folder_images(text) is not None:
        train, val, images = _folder_inputs(Path(text), norm, **image_options)
    else:
        raise BrnError(f"`data` {text}: inputs only are read from an .npz, a folder of images/ or a callable")
    if len(train) == 0:  # type: ignore[arg-type]
        raise BrnError(f"{text}: the training set is empty")
    if val is not None and len(val) == 0:  # type: ignore[arg-type]
        raise BrnError(f"{text}: the validation set is empty")
    if val is not None and val_split is not None:
        raise BrnError(f"{text} has a validation set already; drop `val_split`")
    if val_split is not None:
        train, val = _random_split(train, val_split, seed)
    shape = tuple(train[0][0].shape)
    _check_normalize_channels(norm, shape[0] if shape else 1)
    name = Path(text).name if kind == "npz" else text
    desc = f"{name}: {len(train)} train" + (f" / {len(val)} val" if val is not None else "")  # type: ignore[arg-type]
    desc += f", inputs only, x {list(shape)}"
    labels = _no_labels(train), (_no_labels(val) if val is not None else None)
    return DataBundle(train, val, *labels, 0, shape, desc, text, images)


def _npz_inputs(path: Path, norm) -> tuple[Dataset, Dataset | None]:
    with _open_npz(path) as arrays:
        names = set(arrays.files)
        if "x_train" not in names:
            raise BrnError(f"{path} has no x_train (arrays: {', '.join(sorted(names)) or 'none'})")
        raw = {k: _read_npz_array(arrays, k, path) for k in ("x_train", "x_val") if k in names}
    x = {k: _normalize_tensor(_to_float_images(v, f"{path}: {k}"), norm, k) for k, v in raw.items()}
    x_val = x.get("x_val")
    if x_val is not None and x_val.shape[1:] != x["x_train"].shape[1:]:
        raise BrnError(
            f"{path}: x_val examples have shape {list(x_val.shape[1:])}, x_train {list(x['x_train'].shape[1:])}"
        )
    val = ArrayDataset(x_val, _no_labels(x_val)) if x_val is not None else None
    return ArrayDataset(x["x_train"], _no_labels(x["x_train"])), val


def _no_labels(items: Any) -> Tensor:
    """The dummy targets of `items` examples (a dataset or a tensor): all 0."""
    return torch.zeros(len(items), dtype=torch.int64)


def _callable_inputs(spec: str, norm) -> tuple[Dataset, Dataset | None]:
    from brn_cli.storage.checkpoint import import_callable

    result: Any = import_callable(spec, param="data")()
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise BrnError(f"`data` {spec} must return (train_dataset, val_dataset), got {type(result).__name__}")
    train, val = result
    return InputsDataset(train, spec, norm), (InputsDataset(val, spec, norm) if val is not None else None)


def _random_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, val): a seeded random `fraction` of the examples held out."""
    n = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * fraction))
    if n_val == 0 or n_val == n:
        raise BrnError(f"`val_split` {fraction} leaves an empty train or validation set")
    tr, va = order[n_val:].sort().values, order[:n_val].sort().values
    return _Subset(dataset, tr, _no_labels(tr)), _Subset(dataset, va, _no_labels(va))


def mask_folder_images(spec: str | os.PathLike) -> dict[str, Path] | None:
    """{"train": images folder[, "val": ...]} of a folder of images/ and masks/ (or train/ and val/ each
    holding both); None for anything else."""
    path = Path(str(spec))
    if _has_images_and_masks(path):
        return {"train": path / "images"}
    if not _has_images_and_masks(path / "train"):
        return None
    return {s: path / s / "images" for s in ("train", "val") if _has_images_and_masks(path / s)}


def _has_images_and_masks(path: Path) -> bool:
    return (path / "images").is_dir() and (path / "masks").is_dir()


class ImageFiles(Dataset):
    """Image files decoded on access: float32 [C, H, W], resized (bilinear) and center-cropped as a
    segmentation folder's images are; target 0."""

    def __init__(self, files: list[Path], reader: ImageReader, norm) -> None:
        self.samples = [(str(file), 0) for file in files]
        self.reader = reader
        self.norm = norm
        self.resize: int | None = None  # shorter side, then a center crop of `crop`
        self.crop: int | None = None
        self.size: tuple[int, int] | None = None  # else every image is resized to this (H, W)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        x = F.to_tensor(self.reader(self.samples[index][0]))
        if self.crop is not None and self.resize is not None:
            x = F.center_crop(F.resize(x, self.resize, InterpolationMode.BILINEAR, antialias=True), self.crop)
        elif self.size is not None and tuple(x.shape[1:]) != self.size:
            x = F.resize(x, list(self.size), InterpolationMode.BILINEAR, antialias=True)
        if self.norm is not None:
            x = _normalize_tensor(x[None], self.norm, "the images")[0]
        return x, 0


def _folder_inputs(
    path: Path, norm, *, image_size=None, resize_size=None, channels=None
) -> tuple[Dataset, Dataset | None, ImageReader]:
    from brn_cli.data.segmentation import IMAGE_SUFFIXES, _image_files

    try:
        import torchvision  # noqa: F401  # ImageFiles decodes and resizes with it
    except ImportError:
        raise BrnError("a folder of images needs torchvision installed") from None
    reader = ImageReader(channels)
    _check_normalize_channels(norm, reader.channels)
    reader.normalize = norm
    splits: dict[str, ImageFiles] = {}
    for split, folder in (mask_folder_images(path) or {}).items():
        files = list(_image_files(folder).values())
        if not files:
            raise BrnError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        splits[split] = ImageFiles(files, reader, norm)
    if image_size is not None:
        resize = resize_size if resize_size is not None else default_resize_size(image_size)
        for dataset in splits.values():
            dataset.resize, dataset.crop = resize, image_size
    else:  # every image resized to the first training image's size, as the masks' loader does
        width, height = reader(splits["train"].samples[0][0]).size
        for dataset in splits.values():
            dataset.size = (height, width)
    return splits["train"], splits.get("val"), reader
