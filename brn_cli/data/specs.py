"""Preprocessing options: normalization, image and resize sizes, and how a checkpoint records them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from brn_cli.errors import BrnError

__all__ = [
    "default_resize_size",
    "parse_normalize",
    "preprocessing_record",
]


def resolve_normalize(given: str | None, recorded: str | None) -> str | None:
    """The --normalize to use: the one given ("none" for no normalization), else the one a checkpoint
    recorded when it was fine-tuned (a model scores at chance on inputs prepared differently)."""
    if given is not None:
        return None if given.strip().lower() == "none" else given
    return recorded or None


def parse_normalize(text: str | None) -> tuple[Tensor, Tensor] | None:
    """'MEAN,STD' or 'M1,..,Mc,S1,..,Sc' -> (mean [c], std [c]); None or "none" -> None."""
    if text is None or not text.strip() or text.strip().lower() == "none":
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise BrnError(f"--normalize {text!r}: expected numbers MEAN,STD or M1,M2,M3,S1,S2,S3") from None
    if len(values) < 2 or len(values) % 2:
        raise BrnError(f"--normalize {text!r}: expected MEAN,STD or one mean and one std per channel")
    c = len(values) // 2
    mean, std = torch.tensor(values[:c]), torch.tensor(values[c:])
    if (
        not bool(torch.isfinite(mean).all())
        or not bool((std > 0).all())
        or not bool(torch.isfinite(std).all())
    ):
        raise BrnError(f"--normalize {text!r}: means must be finite and stds positive")
    return mean, std


def default_resize_size(image_size: int) -> int:
    """torchvision's classification presets: resize the shorter side to crop / 0.875 (224 -> 256)."""
    return round(image_size / 0.875)


def preprocessing_record(
    normalize: str | None = None, image_size: int | None = None, resize_size: int | None = None
) -> dict[str, Any] | None:
    """The ``preprocessing`` entry of a checkpoint for inputs prepared with these options (None: nothing)."""
    record: dict[str, Any] = {}
    if normalize and normalize.strip().lower() != "none":
        record["normalize"] = normalize
    if image_size is not None:
        record["image_size"] = int(image_size)
        record["resize_size"] = (
            int(resize_size) if resize_size is not None else default_resize_size(image_size)
        )
    return record or None


def _check_image_size(image_size: int | None, resize_size: int | None) -> None:
    if image_size is None:
        if resize_size is not None:
            raise BrnError("--resize-size needs --image-size (the crop it is resized for)")
        return
    if image_size < 1:
        raise BrnError(f"--image-size must be >= 1, got {image_size}")
    if resize_size is not None and resize_size < image_size:
        raise BrnError(
            f"--resize-size {resize_size} is smaller than --image-size {image_size}: nothing to crop"
        )
