"""Where a command runs: the device every command accepts, and how many CPU threads it uses."""

from __future__ import annotations

import os

import torch

from brn_cli.errors import BrnError

__all__ = [
    "available_threads",
    "resolve_device",
    "set_threads",
]

_EXAMPLES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(spec: str | None, *, local_rank: int | None = None) -> torch.device:
    """The torch.device named by `spec`, checked to be usable on this machine; BrnError (param="device") if not.

    `spec`: "auto" (or None / ""): CUDA when available, else the CPU; or any device string torch knows
    (cpu, cuda, cuda:N, mps, xpu ...). A CUDA device always comes back with its index: "auto" and "cuda"
    mean the current GPU, or with `local_rank` (one process per GPU, as torchrun starts them) the GPU of
    that rank, ``cuda:<local_rank>``.
    """
    text = (spec or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise BrnError(
            f"device {spec!r} is not a device torch knows (expected {_EXAMPLES})", param="device"
        ) from None
    if device.type == "cuda":
        return _cuda_device(spec, device, local_rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BrnError(f"device {spec!r}: MPS is not available on this machine", param="device")
    if device.type == "meta":
        raise BrnError(
            f"device {spec!r} holds no data, so nothing can run on it (expected {_EXAMPLES})", param="device"
        )
    if device.type not in ("cpu", "mps"):
        _check_other_backend(spec, device)
    return device


def _cuda_device(spec: str | None, device: torch.device, local_rank: int | None) -> torch.device:
    """A CUDA device with its index: torch.cuda.set_device refuses a bare "cuda"."""
    if not torch.cuda.is_available():
        raise BrnError(
            f"device {spec!r}: CUDA is not available on this machine (use `device=cpu`)", param="device"
        )
    count = torch.cuda.device_count()
    if device.index is not None:
        if device.index >= count:
            raise BrnError(f"device {spec!r}: only {count} CUDA device(s) visible", param="device")
        return device
    if local_rank is None:
        return torch.device("cuda", torch.cuda.current_device())
    if local_rank >= count:
        raise BrnError(
            f"device {spec!r}: local rank {local_rank} has no GPU, this node has {count}; "
            "start at most one process per GPU (torchrun --nproc-per-node)",
            param="device",
        )
    return torch.device("cuda", local_rank)


def _check_other_backend(spec: str | None, device: torch.device) -> None:
    """A backend without a check of its own here (xpu, hpu ...): usable when a tensor can be made on it."""
    try:
        torch.empty(0, device=device)
    except Exception as exc:  # each backend fails in its own way (RuntimeError, AssertionError, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BrnError(
            f"device {spec!r} is not available on this machine ({reason[:200]})", param="device"
        ) from None


def available_threads() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_threads(requested: int | None) -> int:
    """torch.set_num_threads(min(available, requested)); returns the number set.

    On a shared machine oversubscribed threads cost far more than they give (measured: 2 threads under
    load ran 10x slower than 1), so never more threads than cores.
    """
    n = available_threads() if requested is None else min(int(requested), available_threads())
    if n < 1:
        raise BrnError(f"`threads` must be >= 1, got {requested}")
    torch.set_num_threads(n)
    return n
