"""Fine-tune a (converted) BatchNorm model with Batch Renormalization: the library entry point.

:func:`run_finetune` builds a :class:`~brn_cli.train.trainer.Trainer` from a
:class:`~brn_cli.train.config.FinetuneConfig` and runs it; the engine, its state and the run folder live in
:mod:`brn_cli.train.trainer`, :mod:`brn_cli.train.state` and :mod:`brn_cli.train.runfolder`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from brn_cli.progress import Progress
from brn_cli.train.config import (
    LR_SCHEDULES,
    OPTIMIZERS,
    RESUME_OVERRIDABLE,
    FinetuneConfig,
)
from brn_cli.train.state import lr_at
from brn_cli.train.trainer import FinetuneInterrupted, FinetuneResult, Trainer

__all__ = [
    "FinetuneConfig",
    "FinetuneInterrupted",
    "FinetuneResult",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "RESUME_OVERRIDABLE",
    "lr_at",
    "run_finetune",
]


def run_finetune(
    config: FinetuneConfig, *, progress: Progress | bool | None = None, task: Any = None
) -> FinetuneResult:
    """Fine-tune `config.checkpoint` on `config.data`, writing RUNDIR (see :mod:`brn_cli.train.trainer`).

    Returns the final and best metrics. Raises BrnError on bad input and FinetuneInterrupted (after saving
    last.pt) on SIGINT / SIGTERM. RUNDIR is locked until this returns
    (see :func:`brn_cli.storage.atomic.folder_lock`). `progress` receives the step count and a status line
    (a bool is accepted from older callers: the library draws nothing itself); `task` gives the loss and
    the metric (default: classification).
    """
    with contextlib.ExitStack() as held:
        reporter = None if isinstance(progress, bool) else progress
        return Trainer(config, held=held, task=task, progress=reporter).fit()
