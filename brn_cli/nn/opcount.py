"""How many aten operations one training step of a norm layer dispatches: a clock-free cost measure.

On a CPU every dispatched operation costs microseconds of overhead whatever its size, and on a GPU each
one is a kernel launch, so for small and medium layers the count, not the arithmetic, sets the price of
the per-channel bookkeeping. Counted with a ``TorchDispatchMode``, which sees every operation that
reaches the dispatcher below autograd (views included), so the count is deterministic and testable
where timings are not.

Compiled steps (:func:`count_compiled_step`) are counted in what they launch: the kernels inductor generated
(read from its wrapper code: they bypass the dispatcher) plus every operation that still reaches the
dispatcher at run time (extern kernels, fallbacks, runtime wrappers), with an opaque custom op counted as
the operations it runs inside.
"""

from __future__ import annotations

import ast
import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "CompiledOpCount",
    "OpCount",
    "count_compiled_renorm_vs_batchnorm",
    "count_compiled_step",
    "count_layer_step",
    "count_renorm_vs_batchnorm",
]


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


def _layer_pair_and_input(
    shape: Sequence[int], rmax: float, dmax: float, dtype: torch.dtype, device: str | torch.device
) -> tuple[nn.Module, nn.Module, Tensor]:
    """nn.BatchNorm and the renorm layer of `shape`'s dimensionality and channels, and a seeded input."""
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
    return bn, brn, x


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
    bn, brn, x = _layer_pair_and_input(shape, rmax, dmax, dtype, device)
    return {"batchnorm": count_layer_step(bn, x), "renorm": count_layer_step(brn, x)}


# ----------------------------------------------------------------------------------------------
# Compiled steps
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledOpCount:
    """What one compiled training step launches, forward and backward separately.

    kernels: calls of inductor-generated kernels in the compiled wrapper code. ops: operations that
    reach the dispatcher while the compiled code runs (extern kernels such as mm, fallbacks, and the
    operations run inside opaque custom ops), by name. opaque: the custom ops called, by name; each is
    counted in `ops` as the operations it runs, not as one. forward / backward: kernels + ops.
    """

    forward_kernels: int
    backward_kernels: int
    forward_ops: dict[str, int] = field(default_factory=dict)
    backward_ops: dict[str, int] = field(default_factory=dict)
    forward_opaque: dict[str, int] = field(default_factory=dict)
    backward_opaque: dict[str, int] = field(default_factory=dict)

    @property
    def forward(self) -> int:
        return self.forward_kernels + sum(self.forward_ops.values())

    @property
    def backward(self) -> int:
        return self.backward_kernels + sum(self.backward_ops.values())


class _RuntimeOpCounter(_OpCounter):
    """Counts what compiled code dispatches while it runs (torch.compile leaves the mode off while it
    traces and compiles, and compiles rather than falling back to eager), expanding opaque custom ops."""

    def __init__(self) -> None:
        super().__init__()
        self.opaque: collections.Counter[str] = collections.Counter()

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = _custom_op_implementation(func)
        if impl is None:
            return super().__torch_dispatch__(func, types, args, kwargs)
        self.opaque[str(func.overloadpacket)] += 1
        with _OpCounter() as inner:  # the Python body of the op, run as the op would run it
            out = impl(*args, **(kwargs or {}))
        self.ops.update(inner.ops)
        return out


def _custom_op_implementation(func) -> Callable | None:
    """The Python function behind a torch.library.custom_op operator, None for built-in operators."""
    if func.namespace in ("aten", "prims", "inductor"):
        return None
    try:
        from torch._library.custom_ops import _maybe_get_opdef
    except ImportError:  # pragma: no cover - older torch: counted as one operation
        return None
    opdef = _maybe_get_opdef(func)
    return None if opdef is None else opdef._init_fn


def _kernel_calls(wrapper_code: str) -> int:
    """Calls of generated kernels in inductor's wrapper code: names bound to ``async_compile.<kind>(...)``
    and called directly (CPU) or through ``.run(...)`` (Triton)."""
    tree = ast.parse(wrapper_code)
    kernels = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            if (
                isinstance(f, ast.Attribute)
                and isinstance(f.value, ast.Name)
                and f.value.id == "async_compile"
            ):
                kernels.update(t.id for t in node.targets if isinstance(t, ast.Name))
    calls = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = (
                node.func.value
                if isinstance(node.func, ast.Attribute) and node.func.attr == "run"
                else node.func
            )
            calls += isinstance(f, ast.Name) and f.id in kernels
    return calls


def count_compiled_step(layer: nn.Module, x: Tensor, *, warmup: int = 1) -> CompiledOpCount:
    """Count what one training step of ``torch.compile(layer)`` launches: the forward on `x`, and the
    backward of ``(layer(x) * g).sum()`` for g = 1 (input and parameter gradients).

    Compiles afresh (torch._inductor.utils.run_and_get_code resets dynamo first, so no cache limit or
    earlier shape makes it fall back or go dynamic) with static shapes, reads the generated
    wrapper code of the forward and backward graphs, runs `warmup` more steps, then counts one step.
    Gradients are cleared before each step, so the backward's count includes storing each gradient
    (AccumulateGrad: one ``aten.detach`` per gradient, 3 for input, weight and bias) but no addition.
    """
    from torch._inductor.utils import run_and_get_code

    if not hasattr(TorchDispatchMode, "ignore_compile_internals"):
        raise RuntimeError(f"counting compiled operations needs a newer torch than {torch.__version__}")
    layer.train()
    x = x.detach().requires_grad_(True)
    grad = torch.ones_like(x)
    compiled = torch.compile(layer, dynamic=False)

    def clear_grads() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)

    def steps() -> None:
        for _ in range(1 + warmup):
            clear_grads()
            compiled(x).backward(grad)

    _, codes = run_and_get_code(steps)  # resets dynamo first, and returns each graph's wrapper code
    # The backward graph takes the upstream gradients as its `tangents_*` inputs.
    backward_codes = [c for c in codes if "tangents_" in c]
    forward_codes = [c for c in codes if "tangents_" not in c]
    if not forward_codes or not backward_codes:
        raise RuntimeError(
            f"torch.compile generated no forward or no backward code for {type(layer).__name__}"
        )
    clear_grads()
    with _RuntimeOpCounter() as fwd:
        y = compiled(x)
    with _RuntimeOpCounter() as bwd:
        y.backward(grad)
    return CompiledOpCount(
        forward_kernels=sum(map(_kernel_calls, forward_codes)),
        backward_kernels=sum(map(_kernel_calls, backward_codes)),
        forward_ops=dict(fwd.ops),
        backward_ops=dict(bwd.ops),
        forward_opaque=dict(fwd.opaque),
        backward_opaque=dict(bwd.opaque),
    )


def count_compiled_renorm_vs_batchnorm(
    shape: Sequence[int] = (256, 512),
    *,
    rmax: float = 3.0,
    dmax: float = 5.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, CompiledOpCount]:
    """:func:`count_compiled_step` of nn.BatchNorm and of the renorm layer (limits off their BatchNorm
    values, so r and d are computed and clipped) for an input of `shape`."""
    bn, brn, x = _layer_pair_and_input(shape, rmax, dmax, dtype, device)
    return {"batchnorm": count_compiled_step(bn, x), "renorm": count_compiled_step(brn, x)}
