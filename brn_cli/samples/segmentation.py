"""A dense task from the bundled digits: every pixel labelled with its digit's class or background.

Definition (deterministic, computed at run time from ``mnist_5k.npz``; nothing else is stored): a pixel
whose intensity / 255 exceeds ``INK_THRESHOLD`` (0.5) is ink and gets class ``digit + 1`` (1..10); every
other pixel is background, class 0. So there are ``DIGIT_SEG_CLASSES`` = 11 classes, and each 28 x 28
mask holds background plus exactly one digit class (about 13 % of the pixels are ink). The images are
the digits unchanged (uint8, N x 1 x 28 x 28), so the data loader scales them to [0, 1] as usual.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brn_cli.samples import SAMPLE_DATA

__all__ = [
    "BACKGROUND",
    "DIGIT_SEG_CLASSES",
    "DIGIT_SEG_FILE",
    "INK_THRESHOLD",
    "digit_masks",
    "digits_segmentation_arrays",
]

INK_THRESHOLD = 0.5
BACKGROUND = 0
DIGIT_SEG_CLASSES = 11
DIGIT_SEG_FILE = "digits-seg.npz"  # the name `brn sample-data --task segmentation` and the demo write


def digit_masks(images: np.ndarray, labels: np.ndarray, threshold: float = INK_THRESHOLD) -> np.ndarray:
    """uint8 masks [N, H, W]: ``label + 1`` where ``image / 255 > threshold``, else 0.

    `images` are uint8 digits [N, 1, H, W] or [N, H, W], `labels` their classes 0..9 [N].
    """
    pixels = images[:, 0] if images.ndim == 4 else images
    ink = pixels.astype(np.float32) / 255.0 > threshold
    classes = (np.asarray(labels, dtype=np.int64) + 1).astype(np.uint8)
    return np.where(ink, classes[:, None, None], np.uint8(BACKGROUND)).astype(np.uint8)


def digits_segmentation_arrays(path: str | Path = SAMPLE_DATA) -> dict[str, np.ndarray]:
    """The digits segmentation set as the arrays of an .npz: ``x_train``, ``x_val`` (the digits, uint8
    [N, 1, 28, 28]) and ``y_train``, ``y_val`` (their masks, uint8 [N, 28, 28])."""
    with np.load(path, allow_pickle=False) as digits:
        arrays = {k: digits[k] for k in ("x_train", "y_train", "x_val", "y_val")}
    return {
        "x_train": arrays["x_train"],
        "y_train": digit_masks(arrays["x_train"], arrays["y_train"]),
        "x_val": arrays["x_val"],
        "y_val": digit_masks(arrays["x_val"], arrays["y_val"]),
    }
