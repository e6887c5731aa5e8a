"""A loss or a metric of the user's own, named as ``package.module:callable`` (so it may be imported).

``loss(output, target)`` must return a scalar tensor (the engine backpropagates it); ``metric(output,
target)`` a number or a dict of numbers, averaged over the examples of a split (weighted by batch size); with a
dict the first key is the primary metric, with a number the callable's name. What the callable does not replace
comes from the task it extends (classification by default). A callable that raises, or returns something
else, stops the command with one line naming it; the engine calls both once on two examples before it writes
anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from brn_cli.errors import BrnError, first_line
from brn_cli.tasks.base import Task, scalar_state_reduce

__all__ = ["Custom"]


def _call(fn: Callable[..., Any], spec: str, param: str, output: Any, target: Any) -> Any:
    try:
        return fn(output, target)
    except BrnError:
        raise
    except Exception as exc:  # the user's code: any failure is reported as theirs, in one line
        raise BrnError(
            f"`{param}` {spec} raised {type(exc).__name__}: {first_line(exc, 200)}", param=param
        ) from None


def _metric_values(value: Any, spec: str, default_name: str) -> dict[str, float]:
    items = value.items() if isinstance(value, dict) else [(default_name, value)]
    values = {}
    for name, v in items:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BrnError(
                f"`metric` {spec} returned {type(v).__name__} for {name!r}; expected a number or a dict of "
                "numbers",
                param="metric",
            )
        values[str(name)] = float(v)
    if not values:
        raise BrnError(
            f"`metric` {spec} returned an empty dict; expected a number or a dict of numbers", param="metric"
        )
    return values


class Custom(Task):
    """`base` with its loss and/or metric replaced by the user's callables (see the module docstring)."""

    def __init__(
        self,
        base: Task,
        *,
        loss: tuple[str, Callable[..., Any]] | None = None,
        metric: tuple[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.base, self.loss_fn, self.metric_fn = base, loss, metric
        self.name = base.name
        self.metric_name = base.metric_name
        self.train_metric_name = base.train_metric_name
        if metric is not None:
            self.metric_name = self.train_metric_name = metric[0].rpartition(":")[2]

    def settings(self) -> dict[str, Any]:
        return self.base.settings()  # the callables are code: never recorded to be run again

    def check(self, output: Any, target: Any = None, num_classes: int | None = None) -> None:
        if self.metric_fn is None:  # the task's own metric reads the output: it must have that task's shape
            self.base.check(output, target, num_classes if self.loss_fn is None else None)

    def loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is None:
            return self.base.loss(output, target)
        spec, fn = self.loss_fn
        value = _call(fn, spec, "loss", output, target)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
            got = (
                f"a tensor of shape {list(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise BrnError(
                f"`loss` {spec} returned {got}; expected a scalar (0-d) float tensor", param="loss"
            )
        return value.reshape(())

    def metric_values(self, output: Any, target: torch.Tensor) -> dict[str, float]:
        """The user's metric of one batch; the first entry is the primary one (and names it)."""
        assert self.metric_fn is not None
        spec, fn = self.metric_fn
        values = _metric_values(_call(fn, spec, "metric", output, target), spec, self.metric_name)
        self.metric_name = self.train_metric_name = next(iter(values))
        return values

    def batch_metric(self, output: Any, target: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.metric_fn is None:
            return self.base.batch_metric(output, target)
        n = len(target)
        return torch.tensor(next(iter(self.metric_values(output, target).values())) * n), n

    def metric_state(self) -> dict[str, Any]:
        base = self.base.metric_state() if self.metric_fn is None else None
        return {"loss_sum": 0.0, "count": 0.0, "sums": {}, "base": base}

    def update(self, state: dict[str, Any], output: Any, target: torch.Tensor) -> None:
        n = len(target)
        state["loss_sum"] += float(self.loss(output, target)) * n
        state["count"] += n
        if state["base"] is not None:
            self.base.update(state["base"], output, target)
            return
        for name, value in self.metric_values(output, target).items():
            state["sums"][name] = state["sums"].get(name, 0.0) + value * n

    def reduce(self, state: dict[str, Any], dist: Any) -> dict[str, Any]:
        sums = scalar_state_reduce(
            {"loss_sum": state["loss_sum"], "count": state["count"], **state["sums"]}, dist
        )
        base = self.base.reduce(state["base"], dist) if state["base"] is not None else None
        loss_sum, count = sums.pop("loss_sum"), sums.pop("count")
        return {"loss_sum": loss_sum, "count": count, "sums": sums, "base": base}

    def compute(self, state: dict[str, Any]) -> dict[str, Any]:
        count = self._need_examples(state)
        loss = state["loss_sum"] / count
        if state["base"] is not None:
            base = self.base.compute(state["base"])
            return {**base, "loss": loss if self.loss_fn is not None else base["loss"]}
        return {"loss": loss, **{name: total / count for name, total in state["sums"].items()}}
