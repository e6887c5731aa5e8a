"""What a model returned: its tensors as a flat list, or its class scores.

Conversion checks, state-dict export, ONNX export and ONNX verification all compare "the outputs" of a model;
classifiers return a tensor, detection and segmentation models tuples, lists or dicts, nested (a torchvision
detector returns a list of dicts). Evaluation, training and the data checks
read the class scores out of the same containers.
"""

from __future__ import annotations

from typing import Any

import torch

from brn_cli.errors import BrnError


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in `out`, a tensor or any nesting of lists, tuples and dicts, depth first.

    Lists and tuples in order, dicts in insertion order (the order torch.onnx flattens them in, so the list
    lines up with an exported model's outputs); anything else (None, numbers, strings) is skipped. A
    torchvision detector's ``[{"boxes": ..., "labels": ..., "scores": ...}, ...]`` gives boxes, labels and
    scores of the first image, then of the second, and so on.

    Example::

        >>> import torch
        >>> from brn_cli import flat_outputs
        >>> out = [{"boxes": torch.zeros(2, 4), "labels": torch.ones(2)}, {"boxes": torch.zeros(0, 4)}]
        >>> [tuple(t.shape) for t in flat_outputs(out)]
        [(2, 4), (2,), (0, 4)]
    """
    found: list[torch.Tensor] = []
    _collect_tensors(out, found)
    return found


def _collect_tensors(out: Any, found: list[torch.Tensor]) -> None:
    if isinstance(out, torch.Tensor):
        found.append(out)
    elif isinstance(out, dict):
        for value in out.values():
            _collect_tensors(value, found)
    elif isinstance(out, (list, tuple)):
        for value in out:
            _collect_tensors(value, found)


def model_logits(output: Any) -> torch.Tensor:
    """The class scores of a model output: a tensor, the first item of a tuple, or a dict's 'logits'."""
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    elif isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        logits = output["logits"]
    else:
        raise BrnError(f"the model returned {type(output).__name__}; expected class scores [batch, classes]")
    if logits.dim() != 2:
        raise BrnError(
            f"the model returned shape {list(logits.shape)}; expected class scores [batch, classes]"
        )
    return logits
