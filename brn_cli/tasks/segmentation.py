"""Semantic segmentation: per-pixel class scores [N, K, H, W] against class maps [N, H, W].

The output is a tensor, or a dict with ``out`` and optionally ``aux`` (torchvision's segmentation models).
The loss is cross-entropy over the pixels whose target is not `ignore_index`, plus 0.5 times the same loss
of ``aux`` when the model gives one, as torchvision's reference ``references/segmentation/train.py`` does.
The metrics come from a K x K confusion matrix over the whole split (rows: true class, columns: predicted),
as that script's ``ConfusionMatrix``: pixel accuracy = trace / total, IoU_c = C_cc / (row_c + col_c - C_cc),
mean IoU = the mean of IoU_c over the classes that occur in the targets or the predictions (a class absent
from both has no IoU rather than a 0/0).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from brn_cli.errors import BrnError
from brn_cli.tasks.base import Task, describe_output
from brn_cli.tasks.names import DEFAULT_IGNORE_INDEX

__all__ = ["AUX_WEIGHT", "DEFAULT_IGNORE_INDEX", "Segmentation", "confusion_matrix", "segmentation_scores"]

AUX_WEIGHT = 0.5  # torchvision references/segmentation/train.py: losses["out"] + 0.5 * losses["aux"]


def _main_and_aux(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, dict) and isinstance(output.get("out"), torch.Tensor):
        aux = output.get("aux")
        return output["out"], aux if isinstance(aux, torch.Tensor) else None
    raise BrnError(
        "the segmentation task expects the model to return scores [N, K, H, W] or a dict with 'out'; got "
        f"{describe_output(output)}"
    )


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, classes: int, ignore_index: int
) -> torch.Tensor:
    """int64 [classes, classes]: entry (t, p) counts pixels of true class t predicted as p; pixels whose
    target is `ignore_index` (or outside 0..classes-1) are left out."""
    keep = (target != ignore_index) & (target >= 0) & (target < classes)
    index = target[keep].to(torch.int64) * classes + pred[keep].to(torch.int64)
    return torch.bincount(index, minlength=classes * classes).view(classes, classes)


def segmentation_scores(matrix: torch.Tensor) -> dict[str, Any]:
    """Pixel accuracy, mean IoU and per-class IoU (None where a class occurs nowhere) of a confusion matrix."""
    m = matrix.double()
    hits = torch.diag(m)
    union = m.sum(1) + m.sum(0) - hits
    present = union > 0
    iou = torch.where(present, hits / union.clamp(min=1), torch.zeros_like(hits))
    total = float(m.sum())
    return {
        "pixel_accuracy": float(hits.sum()) / total if total else 0.0,
        "mean_iou": float(iou[present].mean()) if bool(present.any()) else 0.0,
        "iou_per_class": [
            float(v) if p else None for v, p in zip(iou.tolist(), present.tolist(), strict=True)
        ],
    }


class Segmentation(Task):
    """Per-pixel cross-entropy (ignoring `ignore_index`); pixel accuracy and mean IoU."""

    name = "segmentation"
    metric_name = "mean_iou"
    train_metric_name = "pixel_accuracy"

    def __init__(self, ignore_index: int = DEFAULT_IGNORE_INDEX) -> None:
        self.ignore_index = int(ignore_index)

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "ignore_index": self.ignore_index}

    def check(self, output: Any, target: Any = None, num_classes: int | None = None) -> None:
        """Scores [N, K, H, W]; masks [N, H, W] of the same size with classes below K (or ignored)."""
        out, _ = _main_and_aux(output)
        if out.dim() != 4:
            raise BrnError(
                f"the segmentation task expects scores [N, K, H, W]; the model returned shape {list(out.shape)}"
            )
        k = int(out.shape[1])
        if num_classes is not None and num_classes > k:
            raise BrnError(
                f"the masks hold {num_classes} classes (0..{num_classes - 1}) but the model outputs {k} per pixel"
            )
        if target is None:
            return
        mask = torch.as_tensor(target)
        if mask.dim() != 3 or tuple(mask.shape[1:]) != tuple(out.shape[2:]):
            got = "x".join(map(str, mask.shape[1:])) if mask.dim() == 3 else f"shape {list(mask.shape)}"
            raise BrnError(
                f"mask size {got} differs from the model's output size {out.shape[2]}x{out.shape[3]}"
                if mask.dim() == 3
                else f"the segmentation task expects masks [N, H, W]; got targets of {got}"
            )
        labelled = mask[mask != self.ignore_index]
        if labelled.numel() and (int(labelled.max()) >= k or int(labelled.min()) < 0):
            bad = int(labelled.max()) if int(labelled.max()) >= k else int(labelled.min())
            raise BrnError(
                f"a mask holds class {bad} but the model outputs {k} classes per pixel (0..{k - 1}; "
                f"{self.ignore_index} is ignored: `ignore_index`)"
            )

    def loss_sum(self, output: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy of the labelled pixels, plus AUX_WEIGHT times aux's; their count)."""
        out, aux = _main_and_aux(output)
        total = F.cross_entropy(out.float(), target, ignore_index=self.ignore_index, reduction="sum")
        if aux is not None:
            aux_sum = F.cross_entropy(aux.float(), target, ignore_index=self.ignore_index, reduction="sum")
            total = total + AUX_WEIGHT * aux_sum
        return total, (target != self.ignore_index).sum()

    def loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """The mean over the labelled pixels (0, not 0/0, for a batch with none)."""
        total, pixels = self.loss_sum(output, target)
        return total / pixels.clamp(min=1)

    def batch_metric(self, output: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = _main_and_aux(output)
        valid = target != self.ignore_index
        hits = (out.detach().argmax(1) == target) & valid
        return hits.sum(), valid.sum()

    def metric_state(self) -> dict[str, Any]:
        return {"loss_sum": 0.0, "pixels": 0.0, "count": 0.0, "confusion": None}

    def update(self, state: dict[str, Any], output: Any, target: torch.Tensor) -> None:
        out, _ = _main_and_aux(output)
        k = int(out.shape[1])
        matrix = confusion_matrix(out.argmax(1), target, k, self.ignore_index).cpu()
        state["confusion"] = matrix if state["confusion"] is None else state["confusion"] + matrix
        total, pixels = self.loss_sum(output, target)
        state["loss_sum"] += float(total)
        state["pixels"] += int(pixels)
        state["count"] += len(target)

    def reduce(self, state: dict[str, Any], dist: Any) -> dict[str, Any]:
        if state["confusion"] is None and getattr(dist, "world_size", 1) > 1:  # an empty shard
            raise BrnError(
                "no examples to evaluate on one of the processes: the validation split is too small"
            )
        return super().reduce(state, dist)

    def compute(self, state: dict[str, Any]) -> dict[str, Any]:
        self._need_examples(state)
        loss = state["loss_sum"] / max(float(state["pixels"]), 1.0)  # per labelled pixel, as in training
        return {"loss": loss, **segmentation_scores(state["confusion"])}
