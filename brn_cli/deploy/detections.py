"""Compare a torchvision detector's detections in onnxruntime with PyTorch's, detection by detection.

A detector returns, per image, boxes, labels and scores (and masks, keypoints) of the detections that
survived a score threshold, non-maximum suppression and a top-k cut. Rounding differences of 1e-6 between
onnxruntime and PyTorch cannot move a detection's box or score beyond the tolerance, but they can decide
differently between two detections whose scores are *tied within the tolerance*: which one is listed first,
which one non-maximum suppression keeps, which one makes the top k or clears the threshold. Comparing the
tensors row by row then compares different detections. So the detections are paired instead: each PyTorch
detection, best score first, with the ONNX detection of the same label whose box is nearest, when that box is
within the boxes' tolerance. A paired detection's scores, masks and other tensors are then compared with the
usual tolerance. A detection left without a partner fails the check unless a near tie explains it: its score
is within the scores' tolerance of the lowest score of the image (a cut at the threshold or at the top k).
Anything else (a label, a box, a score, a count that differs beyond what a near tie explains) fails.

Masks are compared up to a one-pixel shift: torchvision pastes a mask into the image at its box truncated to
whole pixels (``paste_masks_in_image`` casts the box to int64), so two boxes equal within the tolerance can
straddle a pixel border and paste the same mask one pixel apart, resized to one pixel more or less. Measured
on a random-weight Mask R-CNN at 128x128 (boxes up to 4.5e-3 px apart): 28 of 400 paired masks differed beyond
the tolerance pixel by pixel and agreed within it once each ONNX pixel may take any value in the range of the
PyTorch mask over its 3x3 neighbourhood. No exporter option changes the truncation (torchvision's own code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["MASK_ATOL", "DetectionTally", "detection_groups", "match_image"]

# The least absolute tolerance on mask probabilities. A mask is computed by RoIAlign at its detected box, so a
# box that moved by rounding (2e-3 to 4e-3 px at 96x96 and 128x128, within the boxes' tolerance) moves the
# mask probabilities: by up to 1.9e-3 on random-weight Mask R-CNNs, beyond the default 1e-4 + 1e-4 x 1. Masks
# are used thresholded at 0.5: a probability that moved by 1e-2 changes the binary mask only at pixels within
# 1e-2 of 0.5.
MASK_ATOL = 1e-2

_KEYS = ("boxes", "labels", "scores")


def detection_groups(outputs: Any) -> list[dict[str, int]] | None:
    """Per image, ``{key: index in flat_outputs order}``, for a list of per-image dicts of tensors with boxes,
    labels and scores (a torchvision detector's output); None for any other output."""
    if not isinstance(outputs, (list, tuple)) or not outputs:
        return None
    groups: list[dict[str, int]] = []
    index = 0
    for item in outputs:
        if not isinstance(item, dict) or not all(isinstance(v, torch.Tensor) for v in item.values()):
            return None
        if not all(k in item for k in _KEYS):
            return None
        groups.append({key: index + i for i, key in enumerate(item)})
        index += len(item)
    return groups


@dataclass
class DetectionTally:
    """What the detection-by-detection comparison of one check compared, over its inputs and images."""

    reference: int = 0  # PyTorch detections
    onnx: int = 0  # ONNX detections
    matched: int = 0  # paired by label and box
    near_ties: int = 0  # left unpaired, explained by a score within tolerance of the image's lowest score
    unmatched: int = 0  # left unpaired with no near tie to explain it: the check fails
    masks_shifted: int = 0  # paired masks that agree only up to a one-pixel shift
    masks: bool = False  # the detections have masks (compared with atol at least MASK_ATOL)

    def line(self) -> str:
        """What was compared, in one line."""
        text = f"detections: {self.matched} of {self.reference} PyTorch paired with the {self.onnx} ONNX"
        if self.near_ties:
            text += f", {self.near_ties} unpaired at a near tie (score within tolerance of the lowest)"
        if self.unmatched:
            text += f", {self.unmatched} unpaired"
        if self.masks_shifted:
            text += f", {self.masks_shifted} masks equal up to a one-pixel shift"
        if self.masks:
            text += f"; masks compared with atol >= {MASK_ATOL:g} (used thresholded at 0.5)"
        return text


@dataclass
class ImageMatch:
    """One image's pairing: (PyTorch row, ONNX row) pairs, and the rows left unpaired on each side."""

    pairs: list[tuple[int, int]] = field(default_factory=list)
    want_left: list[int] = field(default_factory=list)
    got_left: list[int] = field(default_factory=list)
    nearest: float = 0.0  # unpaired PyTorch detections: max abs box difference to the nearest same label


def match_image(got: dict[str, np.ndarray], want: dict[str, np.ndarray], box_tol: float) -> ImageMatch:
    """Pair each PyTorch detection (best score first) with the unused ONNX detection of the same label whose
    box is nearest (max abs over the coordinates), when it is within `box_tol`."""
    wb, gb = want["boxes"].reshape(-1, 4), got["boxes"].reshape(-1, 4)
    distance = np.abs(wb[:, None, :] - gb[None, :, :]).max(axis=2, initial=0.0)
    distance[want["labels"].reshape(-1)[:, None] != got["labels"].reshape(-1)[None, :]] = np.inf
    match = ImageMatch()
    used = np.zeros(len(gb), dtype=bool)
    for i in np.argsort(-want["scores"].reshape(-1), kind="stable"):
        row = np.where(used, np.inf, distance[i])
        j = int(np.argmin(row)) if len(row) else -1
        if j >= 0 and row[j] <= box_tol:
            used[j] = True
            match.pairs.append((int(i), j))
        else:
            match.want_left.append(int(i))
            match.nearest = max(match.nearest, float(row[j]) if j >= 0 else np.inf)
    match.got_left = [int(j) for j in np.flatnonzero(~used)]
    return match


def near_tie(scores: Sequence[float], lowest: float, score_tol: float) -> list[bool]:
    """Which unpaired detections a cut explains: a score within `score_tol` of the image's `lowest` score
    (the threshold or the top-k cut fell between two scores closer than the comparison can tell apart)."""
    return [float(s) <= lowest + score_tol for s in scores]


def shifted_mask_difference(got: np.ndarray, want: np.ndarray) -> float:
    """Max over the pixels of how far an ONNX mask pixel lies outside the range of the PyTorch mask over that
    pixel's 3x3 neighbourhood (0 when inside): the difference left once a one-pixel shift is allowed."""
    padded = np.pad(want.reshape(-1, *want.shape[-2:]), ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = want.shape[-2:]
    windows = [padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    low, high = np.min(windows, axis=0), np.max(windows, axis=0)
    flat = got.reshape(low.shape)
    return float(np.maximum(np.maximum(low - flat, flat - high), 0.0).max(initial=0.0))
