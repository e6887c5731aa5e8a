"""Where each normalization layer gets its input from, read off the traced graph.

Folding ``gamma * (x - mu) / sigma + beta`` into the preceding layer is only correct when that layer really
produces the norm's input and nothing else reads its output. Module definition order says nothing about
data flow, so this module traces the model with torch.fx (norm, conv and linear modules kept as leaves)
and answers, for every norm module, "its producer is conv X" or "it cannot be folded, because ...".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from brn_cli.errors import first_line
from brn_cli.nn.norms import (
    folds_as_batch_norm,
    is_batch_norm,
    is_frozen_batch_norm,
    is_peer_renorm,
    norm_channels,
)

FOLDABLE_PRODUCERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


@dataclass
class FoldSite:
    """The fold decision for one norm module: `producer` is set when folding is possible."""

    norm: str
    producer: str | None
    reason: str | None = None
    node: str | None = None  # fx node name of the norm call


class LeafTracer(fx.Tracer):
    """fx tracer that keeps norms, convs and linears (and torch.nn's own modules) as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # torchrl's / sb3-contrib's renorm layers too: traced through, their training forward's in-place
        # updates would replace the layer's buffers by fx proxies.
        if (
            is_batch_norm(m)
            or is_frozen_batch_norm(m)
            or is_peer_renorm(m)
            or isinstance(m, FOLDABLE_PRODUCERS)
        ):
            return True
        return super().is_leaf_module(m, qualname)


class TraceError(Exception):
    """The model could not be traced symbolically; `module` names where tracing failed, if known."""

    def __init__(self, message: str, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace `model` with :class:`LeafTracer`; raises :class:`TraceError` naming the failing module."""
    tracer = LeafTracer()
    stack: list[str] = []
    failed_in: list[str] = []  # innermost module an exception passed through (the stack unwinds by then)
    original_call_module = tracer.call_module

    def call_module(m, forward, args, kwargs):
        stack.append(tracer.path_of_module(m))
        try:
            return original_call_module(m, forward, args, kwargs)
        except Exception:
            if not failed_in:
                failed_in.append(stack[-1])
            raise
        finally:
            stack.pop()

    tracer.call_module = call_module  # type: ignore[method-assign]
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = failed_in[0] if failed_in else None
        text = first_line(exc)
        location = f" in module {where!r}" if where else ""
        raise TraceError(f"torch.fx could not trace the model{location}: {text}", module=where) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "placeholder":
        return "the model input"
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} {node.target!r}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


def _linear_output_rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def find_fold_sites(
    model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None, gm: fx.GraphModule | None = None
) -> list[FoldSite]:
    """For every norm module with running statistics (frozen BatchNorms included): its foldable producer, or
    why there is none.

    With `example_inputs`, shapes are propagated so a Linear is only accepted when the norm runs over its
    output features (a 2-D output). Raises :class:`TraceError` when the model cannot be traced.
    """
    gm = gm if gm is not None else trace(model)
    if example_inputs is not None and _feeds_from_linear(gm):
        _propagate_shapes(gm, example_inputs)
    module_calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    output_nodes: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            output_nodes.update(n for n in node.all_input_nodes)

    sites: list[FoldSite] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not folds_as_batch_norm(gm.get_submodule(node.target)):
            continue
        name = str(node.target)
        if name in seen:
            continue
        seen.add(name)
        reason = _fold_problem(node, gm, module_calls, output_nodes)
        producer = str(node.args[0].target) if reason is None else None
        sites.append(FoldSite(norm=name, producer=producer, reason=reason, node=node.name))
    return sites


def _feeds_from_linear(gm: fx.GraphModule) -> bool:
    """Whether a norm with running statistics takes its input straight from a Linear module."""
    return any(
        n.op == "call_module"
        and folds_as_batch_norm(gm.get_submodule(n.target))
        and n.args
        and isinstance(n.args[0], fx.Node)
        and n.args[0].op == "call_module"
        and isinstance(gm.get_submodule(n.args[0].target), nn.Linear)
        for n in gm.graph.nodes
    )


def _propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record each node's output shape (one eval-mode forward). Only Linear producers need shapes, so callers
    skip this full forward when no norm follows a Linear."""
    from torch.fx.passes.shape_prop import ShapeProp

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        gm.train(was_training)


def _fold_problem(
    node: fx.Node, gm: fx.GraphModule, module_calls: Counter, output_nodes: set[fx.Node]
) -> str | None:
    """Why the norm called at `node` cannot fold into the module that produces its input; None if it can."""
    norm = gm.get_submodule(node.target)
    if module_calls[node.target] > 1:
        return f"the norm is called {module_calls[node.target]} times"
    if not node.args or not isinstance(node.args[0], fx.Node):
        return "its input is not a traced tensor"
    src = node.args[0]
    if src.op != "call_module" or not isinstance(gm.get_submodule(src.target), FOLDABLE_PRODUCERS):
        return f"its input comes from {_describe(src, gm)}, not a conv or linear"
    producer = gm.get_submodule(src.target)
    if module_calls[src.target] > 1:
        return f"producer {src.target!r} is called {module_calls[src.target]} times (shared weights)"
    other_users = [u for u in src.users if u is not node]
    if other_users:
        return f"producer {src.target!r} output also feeds " + ", ".join(
            _describe(u, gm) for u in other_users[:3]
        )
    if src in output_nodes:
        return f"producer {src.target!r} output is also a model output"
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if channels != norm_channels(norm):
        return f"producer {src.target!r} has {channels} outputs, the norm {norm_channels(norm)} channels"
    if isinstance(producer, nn.Linear):
        rank = _linear_output_rank(src)
        if rank is None:
            return (
                "Linear producer: pass an example input so shapes can confirm the norm runs over its features"
            )
        if rank != 2:
            return f"Linear output is {rank}-D: the norm's channel axis is not the Linear's features"
    return None
