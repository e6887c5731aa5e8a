"""Segmentation data: images with class-map masks, for ``load_data(..., task="segmentation")``.

Data specs:
  * an ``.npz`` with ``x_train`` and ``y_train`` (optionally ``x_val``, ``y_val``), where ``y_*`` hold masks
    [N, H, W] (or [N, 1, H, W]) of integer class indices, the same H and W as the images. Images as for
    classification (integer pixels 0..255 are /255; NCHW, NHWC or N x H x W);
  * a folder with ``train/images`` and ``train/masks`` (and optionally ``val/images``, ``val/masks``), or a
    single ``images`` / ``masks`` pair (all training data; hold out a validation set with ``val_split``).
    A mask has its image's file name stem (``0001.jpg`` -> ``0001.png``) and is a grayscale or palette PNG
    (any single-channel image): a palette mask gives its palette indices, never its colours. Images load
    as RGB, or grayscale with ``channels=1`` (as image folders do). ``image_size=S`` resizes the shorter side
    to ``resize_size`` and center-crops S x S; without it every pair is resized to the first training image's
    size. Images are resized bilinearly, masks by nearest neighbour;
  * ``package.module:callable`` returning ``(train_dataset, val_dataset)`` whose items are ``(x, mask)``.

Each example's mask values are 0..K-1 or ``ignore_index``; K (``num_classes``) is the largest other value
plus one. The examples' labels for the samplers are their dominant classes (:mod:`brn_cli.data.masks`).
Bad input (a mask whose size differs from its image, images and masks that do not pair up, non-integer or
negative masks) is one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

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
from brn_cli.data.masks import check_masks, dominant_labels, mask_classes, read_mask_file, resize_mask
from brn_cli.data.specs import check_data_spec, default_resize_size, parse_normalize
from brn_cli.errors import BrnError

__all__ = ["MaskArrayDataset", "SegmentationFolder", "load_segmentation"]

# torchvision ImageFolder's extensions: the files an images/ or masks/ folder may hold.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class MaskArrayDataset(ArrayDataset):
    """In-memory (image, mask) pairs: x float32 [N, C, H, W], masks int64 [N, H, W]; `targets` the dominant
    classes. A batch is gathered whole (brn_cli.data.samplers.make_loader)."""

    def __init__(self, x: Tensor, masks: Tensor, labels: Tensor) -> None:
        super().__init__(x, masks)
        self.targets = labels

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:  # type: ignore[override]
        idx = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(self.x.index_select(0, idx), self.y.index_select(0, idx), strict=True))


def load_segmentation(
    spec: str | os.PathLike,
    val_split: float | None,
    normalize: str | None,
    seed: int,
    *,
    image_size: int | None,
    resize_size: int | None,
    channels: int | None,
    ignore_index: int,
) -> DataBundle:
    """The segmentation data `spec` (module docstring) as a DataBundle of task "segmentation"."""
    kind = check_data_spec(
        spec,
        val_split=val_split,
        normalize=normalize,
        image_size=image_size,
        resize_size=resize_size,
        channels=channels,
    )
    norm, text = parse_normalize(normalize), str(spec)
    images = None
    if kind == "npz":
        parts = _npz_parts(Path(text), norm, ignore_index)
    elif kind == "folder":
        parts, images = _folder_parts(Path(text), norm, image_size, resize_size, channels, ignore_index)
    else:
        parts = _callable_parts(text, norm, ignore_index)
    return _bundle(text, parts, val_split, seed, ignore_index, images)


# ----------------------------------------------------------------------------------------------
# Assembling the bundle
# ----------------------------------------------------------------------------------------------


def _bundle(
    source: str,
    parts: dict[str, Any],
    val_split: float | None,
    seed: int,
    ignore_index: int,
    images: ImageReader | None,
) -> DataBundle:
    """A DataBundle from `parts`: train and val datasets, their labels and masks' classes, a display name."""
    train, y_train, val, y_val = parts["train"], parts["train_labels"], parts["val"], parts["val_labels"]
    split = _held_out(source, val is not None, y_train, val_split, seed)
    if split is not None:
        tr, va = split
        train, val = _split(train, tr, y_train), _split(train, va, y_train)
        y_train, y_val = y_train[tr], y_train[va]
    num_classes = parts["classes"]
    if num_classes == 0:
        raise BrnError(f"{source}: every mask pixel is the ignore index {ignore_index}: nothing to learn")
    shape = tuple(torch.as_tensor(train[0][0]).shape)
    desc = f"{parts['name']}: {len(train)} train" + (f" / {len(val)} val" if val is not None else "")
    desc += f", {num_classes} classes (masks, ignore {ignore_index}), x {list(shape)}"
    bundle = DataBundle(train, val, y_train, y_val, num_classes, shape, desc, source, images)
    bundle.task = "segmentation"
    bundle.ignore_index = ignore_index
    return bundle


def _split(dataset: Dataset, indices: Tensor, labels: Tensor) -> Dataset:
    if isinstance(dataset, MaskArrayDataset):  # stays an array dataset: batches are still one gather
        return MaskArrayDataset(
            dataset.x.index_select(0, indices), dataset.y.index_select(0, indices), labels[indices]
        )
    return _Subset(dataset, indices, labels[indices])


# ----------------------------------------------------------------------------------------------
# .npz
# ----------------------------------------------------------------------------------------------


def _npz_parts(path: Path, norm, ignore_index: int) -> dict[str, Any]:
    raw = _read_npz_pairs(path)
    x_train, m_train = _npz_split(raw, "train", path, norm)
    parts: dict[str, Any] = {"name": path.name, "val": None, "val_labels": None}
    parts["train_labels"] = dominant_labels(m_train, ignore_index)
    parts["train"] = MaskArrayDataset(x_train, m_train, parts["train_labels"])
    masks = [m_train]
    if "x_val" in raw:
        x_val, m_val = _npz_split(raw, "val", path, norm)
        if x_val.shape[1:] != x_train.shape[1:]:
            raise BrnError(
                f"{path}: x_val examples have shape {list(x_val.shape[1:])}, x_train {list(x_train.shape[1:])}"
            )
        parts["val_labels"] = dominant_labels(m_val, ignore_index)
        parts["val"] = MaskArrayDataset(x_val, m_val, parts["val_labels"])
        masks.append(m_val)
    parts["classes"] = mask_classes(masks, ignore_index)
    return parts


def _npz_split(raw: dict[str, np.ndarray], split: str, path: Path, norm) -> tuple[Tensor, Tensor]:
    """(images float32 [N, C, H, W], masks int64 [N, H, W]) of one split, checked against each other."""
    xname, yname = f"x_{split}", f"y_{split}"
    x = _to_float_images(raw[xname], f"{path}: {xname}")
    if x.dim() != 4:
        raise BrnError(
            f"{path}: {xname} must hold images [N, C, H, W] for segmentation, got shape {list(x.shape)}"
        )
    masks = check_masks(raw[yname], f"{path}: {yname}")
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise BrnError(f"{path}: {yname} must hold masks [N, H, W], got shape {list(masks.shape)}")
    if len(masks) != len(x):
        raise BrnError(f"{path}: {xname} has {len(x)} images but {yname} has {len(masks)} masks")
    if len(x) == 0:
        raise BrnError(f"{path}: the {'training' if split == 'train' else 'validation'} set is empty")
    if masks.shape[1:] != x.shape[2:]:
        raise BrnError(
            f"{path}: {yname} masks are {_hw(masks.shape[1:])} but {xname} images are {_hw(x.shape[2:])}"
        )
    return _normalize_tensor(x, norm, xname), masks


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]}"


# ----------------------------------------------------------------------------------------------
# Folders of images and masks
# ----------------------------------------------------------------------------------------------


class SegmentationFolder(Dataset):
    """(image, mask) file pairs, decoded on access: image float32 [C, S, S] (or the fixed size), mask int64.

    `samples` (image path, mask path) and `root` as torchvision's ImageFolder has them (run folders hash them).
    """

    def __init__(self, root: Path, pairs: list[tuple[Path, Path]], reader: ImageReader, norm) -> None:
        self.root = str(root)
        self.samples = [(str(image), str(mask)) for image, mask in pairs]
        self.reader = reader
        self.norm = norm
        self.resize: int | None = None  # shorter side, then a center crop of `crop`
        self.crop: int | None = None
        self.size: tuple[int, int] | None = None  # else every pair is resized to this (H, W)
        self.targets: Tensor | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        from torchvision.transforms import functional as F

        image_path, mask_path = self.samples[index]
        x = F.to_tensor(self.reader(image_path))
        try:
            mask = read_mask_file(mask_path)
        except BrnError as exc:  # in a DataLoader worker: keep the one line
            raise DataFileError(str(exc)) from None
        if tuple(mask.shape) != tuple(x.shape[1:]):
            raise DataFileError(_size_mismatch(mask_path, mask.shape, x.shape[1:]))
        x, mask = self._fit(x, mask)
        if self.norm is not None:
            x = _normalize_tensor(x[None], self.norm, "the images")[0]
        return x, mask

    def _fit(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Resize (image bilinear, mask nearest) and center-crop one pair to the folder's size."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        if self.crop is not None and self.resize is not None:
            x = F.resize(x, self.resize, InterpolationMode.BILINEAR, antialias=True)
            mask = resize_mask(mask, tuple(x.shape[1:]))
            return F.center_crop(x, self.crop), F.center_crop(mask[None], self.crop)[0]
        if self.size is not None and tuple(x.shape[1:]) != self.size:
            x = F.resize(x, list(self.size), InterpolationMode.BILINEAR, antialias=True)
            mask = resize_mask(mask, self.size)
        return x, mask


def _size_mismatch(mask_path: str, mask_shape: Sequence[int], image_shape: Sequence[int]) -> str:
    return f"{mask_path}: the mask is {_hw(mask_shape)} but its image is {_hw(image_shape)}"


def _folder_parts(
    path: Path, norm, image_size: int | None, resize_size: int | None, channels: int | None, ignore_index: int
) -> tuple[dict[str, Any], ImageReader]:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise BrnError("a folder of images and masks needs torchvision installed") from None
    splits = _folder_layout(path)
    reader = ImageReader(channels)
    _check_normalize_channels(norm, reader.channels)
    reader.normalize = norm
    parts: dict[str, Any] = {"val": None, "val_labels": None}
    classes = 0
    for split, (images_dir, masks_dir) in splits.items():
        dataset = SegmentationFolder(path, _pair_files(images_dir, masks_dir), reader, norm)
        labels, high = _scan_folder(dataset, ignore_index)
        dataset.targets = labels
        parts[split], parts[f"{split}_labels"] = dataset, labels
        classes = max(classes, high)
    how = _set_geometry(parts, image_size, resize_size)
    parts["classes"] = classes
    parts["name"] = f"{path.name} ({how})"
    return parts, reader


def _folder_layout(path: Path) -> dict[str, tuple[Path, Path]]:
    """{"train": (images, masks)[, "val": (images, masks)]} of a segmentation folder."""
    if (path / "train").is_dir():
        splits = {
            s: (path / s / "images", path / s / "masks") for s in ("train", "val") if (path / s).is_dir()
        }
    else:
        splits = {"train": (path / "images", path / "masks")}
    for images_dir, masks_dir in splits.values():
        for folder in (images_dir, masks_dir):
            if not folder.is_dir():
                raise BrnError(
                    f"{path}: segmentation data needs {folder.relative_to(path)}/ (a folder holds images/ and "
                    "masks/, or train/images, train/masks and optionally val/images, val/masks)"
                )
    return splits


def _image_files(folder: Path) -> dict[str, Path]:
    """Stem -> file of the image files in `folder`; two files with one stem are ambiguous."""
    found: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if file.stem in found:
            raise BrnError(
                f"{file}: {found[file.stem].name} has the same name; which one pairs up is unclear"
            )
        found[file.stem] = file
    return found


def _pair_files(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs by file name stem; the first image without a mask (or mask without an image)
    is one line naming it."""
    images, masks = _image_files(images_dir), _image_files(masks_dir)
    if not images:
        raise BrnError(f"{images_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    lonely_images = sorted(images.keys() - masks.keys())
    if lonely_images:
        more = f" ({len(lonely_images)} images have none)" if len(lonely_images) > 1 else ""
        raise BrnError(f"{images[lonely_images[0]]}: no mask named {lonely_images[0]}.* in {masks_dir}{more}")
    lonely_masks = sorted(masks.keys() - images.keys())
    if lonely_masks:
        more = f" ({len(lonely_masks)} masks have none)" if len(lonely_masks) > 1 else ""
        raise BrnError(f"{masks[lonely_masks[0]]}: no image named {lonely_masks[0]}.* in {images_dir}{more}")
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def _scan_folder(dataset: SegmentationFolder, ignore_index: int) -> tuple[Tensor, int]:
    """Every mask read once: checked (values, size against its image's header), its dominant class, K."""
    from PIL import Image

    masks = []
    for image_path, mask_path in dataset.samples:
        mask = read_mask_file(mask_path)
        try:
            with Image.open(image_path) as image:  # the header only: no pixels decoded
                width, height = image.size
        except Exception:  # an unreadable image is reported, naming it, when it is loaded
            width, height = mask.shape[1], mask.shape[0]
        if tuple(mask.shape) != (height, width):
            raise BrnError(_size_mismatch(mask_path, mask.shape, (height, width)))
        masks.append(mask)
    return dominant_labels(masks, ignore_index), mask_classes(masks, ignore_index)


def _set_geometry(parts: dict[str, Any], image_size: int | None, resize_size: int | None) -> str:
    """Give every split the same output size; returns how, for the description."""
    folders = [parts["train"]] + ([parts["val"]] if parts["val"] is not None else [])
    if image_size is not None:
        resize = resize_size if resize_size is not None else default_resize_size(image_size)
        for folder in folders:
            folder.resize, folder.crop = resize, image_size
        return f"shorter side resized to {resize}, center-cropped to {image_size}x{image_size}"
    first = read_mask_file(parts["train"].samples[0][1])
    size = (int(first.shape[0]), int(first.shape[1]))
    for folder in folders:
        folder.size = size
    return f"pairs resized to {_hw(size)}"


# ----------------------------------------------------------------------------------------------
# package.module:callable
# ----------------------------------------------------------------------------------------------


class _CheckedPairs(Dataset):
    """A user's (x, mask) dataset with masks as int64 tensors and x normalized; `targets` the dominant classes."""

    def __init__(self, base: Dataset, labels: Tensor, norm) -> None:
        self.base = base
        self.targets = labels
        self.norm = norm

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, mask = self.base[index][:2]
        x = torch.as_tensor(x, dtype=torch.float32)
        if self.norm is not None:
            x = _normalize_tensor(x[None], self.norm, "the examples")[0]
        mask = torch.as_tensor(mask).to(torch.int64)
        return x, (mask[0] if mask.dim() == 3 else mask)


def _callable_parts(spec: str, norm, ignore_index: int) -> dict[str, Any]:
    from brn_cli.storage.checkpoint import import_callable

    result = import_callable(spec, param="data")()
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise BrnError(f"`data` {spec} must return (train_dataset, val_dataset), got {type(result).__name__}")
    parts: dict[str, Any] = {"name": spec, "val": None, "val_labels": None}
    classes = 0
    for split, dataset in zip(("train", "val"), result, strict=True):
        if dataset is None:
            continue
        what = f"{spec}: {'training' if split == 'train' else 'validation'} set"
        if len(dataset) == 0:
            raise BrnError(f"{what} is empty")
        masks = [_checked_item(dataset[i], f"{what}, example {i}") for i in range(len(dataset))]
        labels = dominant_labels(masks, ignore_index)
        parts[split], parts[f"{split}_labels"] = _CheckedPairs(dataset, labels, norm), labels
        classes = max(classes, mask_classes(masks, ignore_index))
    if parts.get("train") is None:
        raise BrnError(f"`data` {spec} returned no training set")
    parts["classes"] = classes
    return parts


def _checked_item(item: Any, what: str) -> Tensor:
    """The mask of one (x, mask) item, checked: integer values >= 0, [H, W] matching x's last two axes."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise BrnError(f"{what}: items must be (x, mask) pairs, got {type(item).__name__}")
    x, mask = torch.as_tensor(item[0]), check_masks(item[1], what)
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2 or x.dim() != 3:
        raise BrnError(
            f"{what}: expected x [C, H, W] and a mask [H, W], got {list(x.shape)} and {list(mask.shape)}"
        )
    if tuple(mask.shape) != tuple(x.shape[1:]):
        raise BrnError(f"{what}: the mask is {_hw(mask.shape)} but its image is {_hw(x.shape[1:])}")
    return mask
