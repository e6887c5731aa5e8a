"""What a training run optimizes and measures: the task's loss and metric, given to the engine.

A task is an object with ``check(output)`` (the model's output has the task's shape), ``loss(output,
target)`` (a scalar tensor the engine backpropagates) and ``correct(output, target)`` (a 0-d tensor the
engine sums on the device: the metric's numerator over the examples of the batch), plus the names they are
logged under. :class:`Classification` is cross-entropy and accuracy; another task (segmentation,
embeddings) is another class here, with the engine unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from brn_cli.errors import BrnError

if TYPE_CHECKING:
    import torch

__all__ = ["Classification"]


class Classification:
    """Class logits [N, classes] against integer labels [N]: cross-entropy loss, accuracy metric."""

    loss_name = "loss"
    metric_name = "accuracy"

    def check(self, output: Any) -> None:
        import torch

        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            got = f"shape {list(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
            raise BrnError(f"finetune expects the model to return class logits [N, classes]; got {got}")

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(output.float(), target)

    def correct(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (output.detach().argmax(1) == target).sum()
