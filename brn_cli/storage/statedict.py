"""Fine-tuned weights back as a plain BatchNorm state_dict, for the user's own unmodified model code.

Batch Renorm layers store nn.BatchNorm's keys (``weight, bias, running_mean, running_var,
num_batches_tracked``) with ``running_var = sigma^2 - eps``, so the plain BatchNorm built from them has the
identical inference function ``gamma * (x - mu) / sqrt(running_var + eps) + beta``. The file holds nothing but
tensors under the model's own keys: no brn wrapper, no ``module.`` prefixes, no non-persistent scratch
buffers. Tensors are cloned and made contiguous, so shared storage (tied weights) never reaches safetensors,
which rejects it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brn_cli.errors import BrnError, first_line
from brn_cli.storage.atomic import atomic_path, check_writable

__all__ = ["FORMATS", "check_state_dict_roundtrip", "export_state_dict", "plain_state_dict"]

FORMATS = ("pt", "safetensors")


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict as independent contiguous CPU tensors, renorm layers under BatchNorm keys."""
    from brn_cli.storage.checkpoint import strip_prefixes

    state = strip_prefixes(model.state_dict())
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def export_state_dict(
    model: nn.Module, path: str | os.PathLike, *, fmt: str = "pt", force: bool = False
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write :func:`plain_state_dict` atomically as a torch.save file (``pt``) or ``safetensors``; a failed
    write (a full disk) is one BrnError naming `path`.

    Example (the weights load strictly into the model written with plain BatchNorm)::

        >>> import tempfile, torch
        >>> from brn_cli import convert_batchnorm, export_state_dict
        >>> def net(): return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> model = convert_batchnorm(net())
        >>> path, state = export_state_dict(model, tempfile.mkdtemp() + "/weights.pt")
        >>> net().load_state_dict(torch.load(path, weights_only=True), strict=True)
        <All keys matched successfully>
    """
    from brn_cli.storage.checkpoint import reporting_write_errors

    if fmt not in FORMATS:
        raise BrnError(f"`fmt` {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_writable(path, force=force)
    state = plain_state_dict(model)
    with atomic_path(path, force=force) as tmp, reporting_write_errors(path):
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(state, tmp)
    return Path(path), state


@torch.no_grad()
def check_state_dict_roundtrip(
    state: Mapping[str, torch.Tensor],
    fresh: nn.Module,
    reference: nn.Module,
    input_shape: Sequence[int] | None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Load `state` with ``strict=True`` into `fresh` (the user's unmodified architecture, plain BatchNorm)
    and compare its eval outputs with `reference` on one random input.

    Every output tensor is compared, in any nesting of lists, tuples and dicts. Returns
    {"strict_load": True, "max_abs_diff": float | None, "mismatch": str | None}: ``mismatch`` says how the
    outputs differ in number or shape (then ``max_abs_diff`` is inf); raises BrnError when the strict load fails.
    """
    from brn_cli.nn.convert import eval_output_mismatch, max_eval_difference

    try:
        fresh.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise BrnError(
            f"the exported state_dict does not load strictly into the original architecture: "
            f"{first_line(exc)}"
        ) from None
    if input_shape is None:
        return {"strict_load": True, "max_abs_diff": None, "mismatch": None}
    diff = max_eval_difference(reference, fresh, input_shape, seed=seed)
    mismatch = (
        eval_output_mismatch(reference, fresh, input_shape, seed=seed) if diff == float("inf") else None
    )
    return {"strict_load": True, "max_abs_diff": diff, "mismatch": mismatch}
