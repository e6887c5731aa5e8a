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
from torch.nn.modules.batchnorm import _BatchNorm

from brn_cli.errors import first_line
from brn_cli.nn.layer import BatchRenormNd
from brn_cli.nn.norms import is_norm_with_stats

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
        if isinstance(m, (BatchRenormNd, _BatchNorm, *FOLDABLE_PRODUCERS)):
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
    """For every norm module with running statistics: its foldable producer, or why there is none.

    With `example_inputs`, shapes are propagated so a Linear is only accepted when the norm runs over its
    output features (a 2-D output). Raises :class:`TraceError` when the model cannot be traced.
    """
    gm = gm if gm is not None else trace(model)
    # Shapes only matter for Linear producers; skip the (full forward) propagation when there are none.
    feeds_from_linear = any(
        n.op == "call_module"
        and is_norm_with_stats(gm.get_submodule(n.target))
        and n.args
        and isinstance(n.args[0], fx.Node)
        and n.args[0].op == "call_module"
        and isinstance(gm.get_submodule(n.args[0].target), nn.Linear)
        for n in gm.graph.nodes
    )
    if example_inputs is not None and feeds_from_linear:
        from torch.fx.passes.shape_prop import ShapeProp

        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*example_inputs)
        finally:
            gm.train(was_training)

    module_calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    output_nodes: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            output_nodes.update(n for n in node.all_input_nodes)

    sites: list[FoldSite] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        norm = gm.get_submodule(node.target)
        if not is_norm_with_stats(norm):
            continue
        name = str(node.target)
        if name in seen:
            continue
        seen.add(name)
        site = FoldSite(norm=name, producer=None, node=node.name)
        sites.append(site)
        if module_calls[node.target] > 1:
            site.reason = f"the norm is called {module_calls[node.target]} times"
            continue
        if not node.args or not isinstance(node.args[0], fx.Node):
            site.reason = "its input is not a traced tensor"
            continue
        src = node.args[0]
        if src.op != "call_module" or not isinstance(gm.get_submodule(src.target), FOLDABLE_PRODUCERS):
            site.reason = f"its input comes from {_describe(src, gm)}, not a conv or linear"
            continue
        producer = gm.get_submodule(src.target)
        if module_calls[src.target] > 1:
            site.reason = (
                f"producer {src.target!r} is called {module_calls[src.target]} times (shared weights)"
            )
            continue
        other_users = [u for u in src.users if u is not node]
        if other_users:
            site.reason = f"producer {src.target!r} output also feeds " + ", ".join(
                _describe(u, gm) for u in other_users[:3]
            )
            continue
        if src in output_nodes:
            site.reason = f"producer {src.target!r} output is also a model output"
            continue
        channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
        if channels != norm.num_features:
            site.reason = (
                f"producer {src.target!r} has {channels} outputs, the norm {norm.num_features} channels"
            )
            continue
        if isinstance(producer, nn.Linear):
            rank = _linear_output_rank(src)
            if rank is None:
                site.reason = "Linear producer: pass an example input so shapes can confirm the norm runs over its features"
                continue
            if rank != 2:
                site.reason = (
                    f"Linear output is {rank}-D: the norm's channel axis is not the Linear's features"
                )
                continue
        site.producer = str(src.target)
    return sites
