"""Device resolution: the same device strings are accepted by every command."""

from __future__ import annotations

import torch

from brn_cli.errors import BrnError

__all__ = [
    "resolve_device",
]


def resolve_device(text: str | None) -> torch.device:
    """'auto' (CUDA when available, else CPU), or any torch device string; BrnError when unusable."""
    if text in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise BrnError(f"--device {text!r} is not a device (try cpu, cuda, cuda:1, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BrnError(f"--device {text}: CUDA is not available on this machine")
    return dev
