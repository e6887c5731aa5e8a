"""How many aten operations one training step of a norm layer dispatches: a clock-free cost measure.

On a CPU every dispatched operation costs microseconds of overhead whatever its size, and on a GPU each
one is a kernel launch, so for small and medium layers the count, not the arithmetic, sets the price of
the per-channel bookkeeping. Counted with a ``TorchDispatchMode``, which sees every operation that
reaches the dispatcher below autograd (views included), so the count is deterministic and testable
where timings are not.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_layer_step", "count_renorm_vs_batchnorm"]


@dataclass(frozen=True)
class OpCount:
    """Operations dispatched by one training forward and by its backward, with a breakdown by name."""

    forward: int
    backward: int
    forward_ops: dict[str, int] = field(default_factory=dict)
    backward_ops: dict[str, int] = field(default_factory=dict)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_layer_step(layer: nn.Module, x: Tensor, *, warmup: int = 1) -> OpCount:
    """Count the operations of one training forward of `layer` on `x` and of the backward of
    ``(layer(x) * g).sum()`` for a fixed upstream gradient g (input and parameter gradients).

    `warmup` uncounted steps run first, so one-time work (caches, lazily built constants) is not counted.
    The layer's running statistics are updated by every step, as in training.
    """
    layer.train()
    x = x.detach().requires_grad_(True)
    grad = torch.ones_like(x)
    for _ in range(warmup):
        layer(x).backward(grad)
    with _OpCounter() as fwd:
        y = layer(x)
    with _OpCounter() as bwd:
        y.backward(grad)
    return OpCount(sum(fwd.ops.values()), sum(bwd.ops.values()), dict(fwd.ops), dict(bwd.ops))


def count_renorm_vs_batchnorm(
    shape: Sequence[int] = (256, 512),
    *,
    rmax: float = 3.0,
    dmax: float = 5.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, OpCount]:
    """Op counts of one training step of nn.BatchNorm and of the renorm layer for an input of `shape`.

    The renorm layer runs with `rmax`/`dmax` off their BatchNorm values (1, 0) so that r and d are
    computed and clipped as in real training.
    """
    from brn_cli.nn.layer import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

    shape = tuple(int(s) for s in shape)
    pairs = {
        2: (nn.BatchNorm1d, BatchRenorm1d),
        3: (nn.BatchNorm1d, BatchRenorm1d),
        4: (nn.BatchNorm2d, BatchRenorm2d),
        5: (nn.BatchNorm3d, BatchRenorm3d),
    }
    if len(shape) not in pairs:
        raise ValueError(f"shape must have 2 to 5 dimensions, got {list(shape)}")
    bn_cls, brn_cls = pairs[len(shape)]
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 2.0 + 0.5).to(device=dev, dtype=dtype)
    c = shape[1]
    bn = bn_cls(c).to(device=dev, dtype=dtype)
    brn = brn_cls(c, rmax=rmax, dmax=dmax).to(device=dev, dtype=dtype)
    return {"batchnorm": count_layer_step(bn, x), "renorm": count_layer_step(brn, x)}
