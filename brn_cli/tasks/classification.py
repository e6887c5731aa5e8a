"""Classification: class scores [N, classes] against integer labels [N]; cross-entropy and accuracy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from brn_cli.errors import BrnError
from brn_cli.nn.outputs import model_logits
from brn_cli.tasks.base import Task, describe_output

__all__ = ["Classification", "class_scores"]


def class_scores(output: Any) -> torch.Tensor:
    """The class scores [N, classes] of one batch's output (a tensor, a tuple's first item, a dict's
    'logits'); anything else, a detector's per-image dicts included, is one line."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], dict):
        keys = ", ".join(map(str, output[0])) or "no keys"
        raise BrnError(
            f"the model returns a list of dicts per image ({keys}), a detector's output; "
            "the classification task scores classifiers only (class scores [batch, classes])"
        )
    try:
        return model_logits(output)
    except BrnError:
        raise BrnError(
            f"the classification task expects the model to return class logits [N, classes]; got "
            f"{describe_output(output)}"
        ) from None


class Classification(Task):
    """Class logits [N, classes] against integer labels [N]: cross-entropy loss, accuracy metric."""

    name = "classification"
    metric_name = "accuracy"
    train_metric_name = "accuracy"

    def check(self, output: Any, target: Any = None, num_classes: int | None = None) -> None:
        """Logits [N, classes]; with `num_classes` (training: the data's classes) the width must be exactly
        that (a wider output is an embedding or another task's head); labels below the width."""
        width = int(class_scores(output).shape[1])
        if num_classes is not None and width != num_classes:
            raise BrnError(
                f"the model returns {width} values per example but the data has {num_classes} classes: a "
                f"classifier needs one output per class; for an embedding model pass `task=embedding`",
                param="task",
            )
        if target is not None:
            labels = torch.as_tensor(target)
            if labels.dim() != 1:
                raise BrnError(
                    f"the classification task expects one label per example; got targets of shape "
                    f"{list(labels.shape)} (masks? pass `task=segmentation`)",
                    param="task",
                )
            if labels.numel() and int(labels.max()) >= width:
                raise BrnError(f"label {int(labels.max())} out of range for a model with {width} outputs")

    def loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(class_scores(output).float(), target)

    def batch_metric(self, output: Any, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        return (class_scores(output).detach().argmax(1) == target).sum(), int(target.shape[0])

    def metric_state(self) -> dict[str, Any]:
        return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}

    def update(self, state: dict[str, Any], output: Any, target: torch.Tensor) -> None:
        logits = class_scores(output).float()
        state["loss_sum"] += float(F.cross_entropy(logits, target, reduction="sum"))
        state["correct"] += int((logits.argmax(1) == target).sum())
        state["count"] += len(target)

    def compute(self, state: dict[str, Any]) -> dict[str, Any]:
        count = self._need_examples(state)
        return {"loss": state["loss_sum"] / count, "accuracy": state["correct"] / count}
