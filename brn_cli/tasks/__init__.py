"""Tasks: what a model's output means against a target, the loss a run optimizes and the metrics it reports.

:func:`make_task` builds one from its name and options: ``classification`` (cross-entropy, accuracy),
``segmentation`` (per-pixel cross-entropy, pixel accuracy and mean IoU), ``embedding`` (batch-hard triplet or
contrastive loss, recall@k), with the loss and/or metric optionally replaced by the user's callables
(:mod:`brn_cli.tasks.custom`). The interface the engine and evaluation call is in :mod:`brn_cli.tasks.base`.
Tasks import neither the data nor the engine: they see tensors only. This module stays light (no torch
until a task is built: the command line's options read its names); the classes load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from brn_cli.errors import BrnError
from brn_cli.tasks.names import (
    DEFAULT_IGNORE_INDEX,
    EMBEDDING_LOSSES,
    TASKS,
    parse_recall_k,
    task_from_record,
)

if TYPE_CHECKING:
    from brn_cli.tasks.base import Task

__all__ = [
    "DEFAULT_IGNORE_INDEX",
    "EMBEDDING_LOSSES",
    "Classification",
    "Embedding",
    "Segmentation",
    "TASKS",
    "Task",
    "make_task",
    "parse_recall_k",
    "task_from_record",
]

_CLASSES = {
    "Task": "brn_cli.tasks.base",
    "Classification": "brn_cli.tasks.classification",
    "Segmentation": "brn_cli.tasks.segmentation",
    "Embedding": "brn_cli.tasks.embedding",
}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_task(
    name: str = "classification",
    *,
    loss: str | None = None,
    metric: str | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    margin: float | None = None,
    embedding_loss: str = "triplet",
    recall_k: str | tuple[int, ...] = (1, 5),
) -> Task:
    """The task `name` with its options; `loss` / `metric` ("package.module:callable", named by the user:
    imported here) replace the task's own."""
    if name not in TASKS:
        raise BrnError(f"task {name!r}: expected one of {', '.join(TASKS)}", param="task")
    from brn_cli.tasks.classification import Classification
    from brn_cli.tasks.embedding import Embedding
    from brn_cli.tasks.segmentation import Segmentation

    task: Task
    if name == "segmentation":
        task = Segmentation(ignore_index)
    elif name == "embedding":
        task = Embedding(embedding_loss, margin, parse_recall_k(recall_k))
    else:
        task = Classification()
    if loss is None and metric is None:
        return task
    from brn_cli.storage.checkpoint import import_callable
    from brn_cli.tasks.custom import Custom

    return Custom(
        task,
        loss=(loss, import_callable(loss, param="loss")) if loss else None,
        metric=(metric, import_callable(metric, param="metric")) if metric else None,
    )
