"""Segmentation masks: checking them, reading them from files, resizing and augmenting them with their images.

A mask is a class map [H, W] of integers: 0..K-1, or ``ignore_index`` (255 by default) for pixels no loss or
metric counts. Masks are never interpolated: resizing and cropping use nearest-neighbour sampling, so no
value appears that was not in the mask, and an augmentation applies the same random draw to an image and
its mask.

Each example also gets one int64 label for the samplers (stratified ``val_split``, ``grouped:K`` batches):
its *dominant class*, the most frequent class other than background (0) and ``ignore_index``; 0 when the
mask holds background only. Background outnumbers the objects in most masks, so counting it would give
every example the same label.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from brn_cli.data.augment import AugmentedDataset, crop_box, example_seed
from brn_cli.errors import BrnError, first_line

__all__ = [
    "BACKGROUND",
    "DEFAULT_IGNORE_INDEX",
    "PairedAugmentedDataset",
    "augment_pair",
    "check_masks",
    "dominant_labels",
    "mask_classes",
    "read_mask_file",
    "resize_mask",
]

DEFAULT_IGNORE_INDEX = 255
BACKGROUND = 0
# As class labels (datasets.MAX_LABEL): a class is an index into the model's K outputs, not an arbitrary id.
MAX_MASK_VALUE = 2**24 - 1
# PIL modes whose pixels are one number each: 1-bit, 8-bit grayscale, palette indices, 16/32-bit integers, float.
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F")


def check_masks(values: Any, what: str) -> Tensor:
    """Masks as int64 [..., H, W]: integer (or whole float) values >= 0. `what` names them in errors."""
    if isinstance(values, Tensor):
        values = values.detach().cpu()
        values = (values.float() if values.dtype == torch.bfloat16 else values).numpy()
    array = np.asarray(values)
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    if array.dtype.kind == "f":
        whole = np.isfinite(array) & (array == np.round(array))
        if not whole.all():
            raise BrnError(f"{what}: masks must hold integer class indices, got {array[~whole].flat[0]:g}")
    elif array.dtype.kind not in "iu":
        raise BrnError(f"{what}: masks must hold integer class indices, got {array.dtype}")
    if array.size:
        low, high = array.min(), array.max()
        if low < 0:
            raise BrnError(f"{what}: mask value {int(low)} is negative (class indices are >= 0)")
        if high > MAX_MASK_VALUE:
            raise BrnError(
                f"{what}: mask value {int(high)} out of range (class indices go up to {MAX_MASK_VALUE})"
            )
    return torch.from_numpy(np.ascontiguousarray(array).astype(np.int64))


def dominant_labels(masks: Tensor | list[Tensor], ignore_index: int) -> Tensor:
    """int64 [N]: each mask's most frequent class other than background and `ignore_index` (ties: the
    smaller class), 0 for a mask of background and ignored pixels only."""
    labels = torch.zeros(len(masks), dtype=torch.int64)
    for i, mask in enumerate(masks):
        labels[i] = dominant_label(mask, ignore_index)
    return labels


def dominant_label(mask: Tensor, ignore_index: int) -> int:
    values = mask.reshape(-1)
    values = values[(values != ignore_index) & (values != BACKGROUND)]
    if values.numel() == 0:
        return BACKGROUND
    return int(torch.bincount(values).argmax())


def mask_classes(masks: Tensor | list[Tensor], ignore_index: int) -> int:
    """The largest class in `masks` other than `ignore_index`, plus one (K); 0 when every pixel is ignored."""
    high = -1
    for mask in masks:
        kept = mask[mask != ignore_index]
        if kept.numel():
            high = max(high, int(kept.max()))
    return high + 1


def read_mask_file(path: str) -> Tensor:
    """One mask file as int64 [H, W]: grayscale values, or palette indices for a palette ("P") PNG (never its
    colours). Colour images and unreadable files are one line naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as fh, Image.open(fh) as image:
            mode = image.mode
            array = np.array(image) if mode in MASK_MODES else None
    except Exception as exc:  # a decoder can fail in many ways (OSError, SyntaxError, ValueError, ...)
        raise BrnError(
            f"{path}: cannot read this mask ({type(exc).__name__}: {first_line(exc, 150)})"
        ) from None
    if array is None:
        raise BrnError(
            f"{path}: a mask must be a grayscale or palette image (one class index per pixel), got mode {mode}"
        )
    return check_masks(array, path)


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Mask [..., H, W] resized to `size` by nearest-neighbour sampling (pixel centres): no new values."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).to(torch.float64)  # exact for every index up to 2**53
    out = torch.nn.functional.interpolate(flat, size=size, mode="nearest-exact")
    return out.to(mask.dtype).reshape(*lead, *size)


def augment_pair(x: Tensor, mask: Tensor, mode: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """An image [C, H, W] and its mask [H, W] through `mode` with one random draw: the same crop box
    (image bilinear, mask nearest-neighbour) and the same flip. The draws are those of
    :func:`brn_cli.data.augment.augment_image`, so the image is transformed exactly as it would be alone."""
    if mode == "crop-flip":
        _, h, w = x.shape
        top, left, ch, cw = crop_box(h, w, generator)
        x, mask = x[:, top : top + ch, left : left + cw], mask[top : top + ch, left : left + cw]
        if (ch, cw) != (h, w):
            x = torch.nn.functional.interpolate(
                x[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True
            )[0].to(x.dtype)
            mask = resize_mask(mask, (h, w))
    if mode in ("flip", "crop-flip") and float(torch.rand((), generator=generator)) < 0.5:
        x, mask = x.flip(-1), mask.flip(-1)
    return x, mask


class PairedAugmentedDataset(AugmentedDataset):
    """Training (image, mask) pairs augmented together, a pure function of (seed, epoch, example index)."""

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x, mask = self.base[index]
        x = torch.as_tensor(x)
        if x.dim() != 3:
            raise BrnError(f"`augment` needs image examples [C, H, W]; this data has shape {list(x.shape)}")
        generator = torch.Generator().manual_seed(example_seed(self.seed, self.epoch, int(index)))
        return augment_pair(x, torch.as_tensor(mask), self.mode, generator)
