"""Preprocessing options: normalization, image and resize sizes, and how a checkpoint records them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from brn_cli.errors import BrnError

__all__ = [
    "IMAGE_CHANNELS",
    "TASKS",
    "check_data_spec",
    "check_task",
    "data_kind",
    "default_resize_size",
    "parse_normalize",
    "preprocessing_for",
    "preprocessing_record",
]


def resolve_normalize(given: str | None, recorded: str | None) -> str | None:
    """The ``normalize`` to use: the one given ("none" for no normalization), else the one a checkpoint
    recorded when it was fine-tuned (a model scores at chance on inputs prepared differently)."""
    if given is not None:
        return None if given.strip().lower() == "none" else given
    return recorded or None


def preprocessing_for(
    recorded: Mapping[str, Any],
    data: str | os.PathLike,
    *,
    normalize: str | None = None,
    image_size: int | None = None,
    resize_size: int | None = None,
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The preprocessing to evaluate or calibrate a checkpoint on `data` with: the options given, else those
    the checkpoint `recorded` when it was fine-tuned (a model scores at chance on inputs prepared differently).

    Returns ``(options, notes)``: `options` are load_data's ``normalize``, ``image_size`` and ``resize_size``;
    each note is ``(parameter, what was taken from the checkpoint)``, for the caller to tell the user.
    """
    notes: list[tuple[str, str]] = []
    chosen = resolve_normalize(normalize, recorded.get("normalize"))
    if normalize is None and chosen is not None:
        notes.append(("normalize", f"inputs normalized with {chosen}"))
    # A recorded crop applies to image folders only: arrays keep the size they were saved at.
    if image_size is None and recorded.get("image_size") and Path(str(data)).is_dir():
        image_size = int(recorded["image_size"])
        resize_size = resize_size if resize_size is not None else recorded.get("resize_size")
        notes.append(("image_size", f"images resized to {resize_size} and center-cropped to {image_size}"))
    return {"normalize": chosen, "image_size": image_size, "resize_size": resize_size}, notes


def data_kind(spec: str | os.PathLike) -> str:
    """Which kind of data `spec` names, read off the path alone: ``"npz"`` (an .npz suffix or any file),
    ``"folder"`` (an ImageFolder-layout directory), ``"callable"`` (``package.module:callable``, no such
    path) or ``"unknown"``. Nothing is opened."""
    text = str(spec)
    path = Path(text)
    if path.suffix == ".npz" or path.is_file():
        return "npz"
    if path.is_dir():
        return "folder"
    if ":" in text and not path.exists():
        return "callable"
    return "unknown"


IMAGE_CHANNELS = (1, 3)
# What the targets of a data set are: a class per example (classification, and embedding, whose labels say
# which examples belong together), or a class map per example (segmentation).
TASKS = ("classification", "segmentation", "embedding")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise BrnError(f"`task` {task!r}: expected one of {', '.join(TASKS)}")
    return task


def check_data_spec(
    spec: str | os.PathLike,
    *,
    val_split: float | None = None,
    normalize: str | None = None,
    image_size: int | None = None,
    resize_size: int | None = None,
    channels: int | None = None,
    augment: str = "none",
) -> str:
    """The checks load_data makes before it reads anything: its options, and that `spec` names data that
    exists. Returns the :func:`data_kind`; a caller can check a data spec this way without loading it."""
    from brn_cli.data.augment import parse_augment

    parse_augment(augment)
    _check_split(val_split)
    _check_image_size(image_size, resize_size)
    _check_channels(channels)
    parse_normalize(normalize)
    text = str(spec)
    path = Path(text)
    if image_size is not None and not path.is_dir():
        raise BrnError(
            f"`image_size` applies to ImageFolder directories; prepare {path.name} at the size the model needs"
        )
    if channels is not None and not path.is_dir():
        raise BrnError(f"`channels` applies to image folders; the examples of {text} keep their own channels")
    kind = data_kind(text)
    if kind == "npz" and not path.exists():
        raise BrnError(f"`data` {text}: no such file")
    if kind == "unknown":
        raise BrnError(
            f"`data` {text}: not an .npz file, a directory with train/ and val/, or package.module:callable"
        )
    return kind


def parse_normalize(text: str | None) -> tuple[Tensor, Tensor] | None:
    """'MEAN,STD' or 'M1,..,Mc,S1,..,Sc' -> (mean [c], std [c]); None or "none" -> None."""
    if text is None or not text.strip() or text.strip().lower() == "none":
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise BrnError(f"`normalize` {text!r}: expected numbers MEAN,STD or M1,M2,M3,S1,S2,S3") from None
    if len(values) < 2 or len(values) % 2:
        raise BrnError(f"`normalize` {text!r}: expected MEAN,STD or one mean and one std per channel")
    c = len(values) // 2
    mean, std = torch.tensor(values[:c]), torch.tensor(values[c:])
    if (
        not bool(torch.isfinite(mean).all())
        or not bool((std > 0).all())
        or not bool(torch.isfinite(std).all())
    ):
        raise BrnError(f"`normalize` {text!r}: means must be finite and stds positive")
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


def _check_split(val_split: float | None) -> None:
    if val_split is not None and not 0.0 < val_split < 1.0:
        raise BrnError(f"`val_split` must be a fraction in (0, 1), got {val_split}")


def _check_channels(channels: int | None) -> None:
    if channels is not None and channels not in IMAGE_CHANNELS:
        raise BrnError(f"`channels` must be 1 or 3, got {channels}")


def _check_image_size(image_size: int | None, resize_size: int | None) -> None:
    if image_size is None:
        if resize_size is not None:
            raise BrnError("`resize_size` needs `image_size` (the crop it is resized for)")
        return
    if image_size < 1:
        raise BrnError(f"`image_size` must be >= 1, got {image_size}")
    if resize_size is not None and resize_size < image_size:
        raise BrnError(
            f"`resize_size` {resize_size} is smaller than `image_size` {image_size}: nothing to crop"
        )
