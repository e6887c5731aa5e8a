"""What every task shares: the interface the engine and evaluation call, and the state over a split.

A task says what a model's output means against a target. The training engine and evaluation call only:

* ``check(output, target, num_classes)``: the output and the target have the task's shapes and fit each
  other (one :class:`~brn_cli.errors.BrnError` line otherwise); ``num_classes`` is the data's class count,
  None when unknown;
* ``loss(output, target)``: the scalar the engine backpropagates (mean over the batch);
* ``batch_metric(output, target)``: (numerator, denominator) of the training metric of one batch, kept on the
  device so the engine sums them over a logging window without a host sync; logged as ``train_metric_name``;
* ``metric_state()``, ``update(state, output, target)``, ``reduce(state, dist)``, ``compute(state)``: the
  validation metrics over a whole split. ``update`` adds a batch (no gradient), ``reduce`` combines the
  states of several processes (``dist.sum(list_of_floats)`` as :class:`brn_cli.train.distributed.DistContext`
  offers; None or one process: unchanged) and ``compute`` gives ``{"loss": ..., metric_name: ..., ...}``:
  floats, plus lists for per-class values.

``metric_name`` is the primary metric (a higher value is better: it picks best.pt and the train/inference gap).
"""

from __future__ import annotations

from typing import Any

import torch

from brn_cli.errors import BrnError

__all__ = ["Task", "describe_output", "scalar_state_reduce"]


def describe_output(output: Any) -> str:
    """A short description of a model output for messages: its shape, or its type and keys."""
    if isinstance(output, torch.Tensor):
        return f"shape {list(output.shape)}"
    if isinstance(output, dict):
        return f"a dict with keys {', '.join(map(str, output)) or 'none'}"
    return type(output).__name__


def scalar_state_reduce(state: dict[str, Any], dist: Any) -> dict[str, Any]:
    """Sum every number and tensor of `state` over the processes of `dist` (one all_reduce)."""
    if dist is None or getattr(dist, "world_size", 1) <= 1:
        return state
    names = sorted(state)
    flat: list[float] = []
    for name in names:
        value = state[name]
        flat += value.double().flatten().tolist() if isinstance(value, torch.Tensor) else [float(value)]
    summed = dist.sum(flat)
    reduced, at = {}, 0
    for name in names:
        value = state[name]
        if isinstance(value, torch.Tensor):
            n = value.numel()
            reduced[name] = (
                torch.tensor(summed[at : at + n], dtype=torch.float64).view_as(value).to(value.dtype)
            )
            at += n
        else:
            reduced[name] = summed[at]
            at += 1
    return reduced


class Task:
    """The shared part of the tasks; a task overrides what differs (see the module docstring)."""

    name = "task"
    loss_name = "loss"
    metric_name = "metric"
    train_metric_name = "metric"

    def settings(self) -> dict[str, Any]:
        """The task as plain data (what a checkpoint records, so evaluate can default to it)."""
        return {"name": self.name}

    def check(self, output: Any, target: Any, num_classes: int | None = None) -> None:
        raise NotImplementedError

    def loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_metric(self, output: Any, target: torch.Tensor) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def metric_state(self) -> dict[str, Any]:
        return {"loss_sum": 0.0, "count": 0.0}

    def update(self, state: dict[str, Any], output: Any, target: torch.Tensor) -> None:
        raise NotImplementedError

    def reduce(self, state: dict[str, Any], dist: Any) -> dict[str, Any]:
        return scalar_state_reduce(state, dist)

    def compute(self, state: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _need_examples(self, state: dict[str, Any]) -> float:
        count = float(state["count"])
        if count == 0:
            raise BrnError("no examples to evaluate: the data is empty")
        return count
