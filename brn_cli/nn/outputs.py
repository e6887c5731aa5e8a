"""A model's output as a flat list of tensors, whatever container it came in.

Conversion checks, ONNX export and ONNX verification all compare "the outputs" of a model; classifiers return
a tensor, detection and segmentation models tuples, lists or dicts.
"""

from __future__ import annotations

from typing import Any

import torch


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of `out` (a tensor, a tuple/list, or a dict's values, one level deep), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []
