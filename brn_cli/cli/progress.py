"""The one terminal renderer of :class:`brn_cli.progress.Progress`: a Rich bar on stderr.

Every long-running command passes a ``RichProgress`` to the library (or to a recipe), so all bars look
alike: label, bar, done/total, time, and a live info line. On stderr, so that ``--json`` output on stdout
stays clean.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from brn_cli.progress import Progress

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as _RichBar
    from rich.progress import TaskID


class RichProgress:
    """A Rich progress bar that implements the :class:`brn_cli.progress.Progress` protocol.

    ``transient=True`` erases the bar when the task stops (short steps: evaluate, export, pretrain);
    ``False`` leaves the finished bar on screen (fine-tuning, reproduce). ``elapsed=True`` shows the time
    spent instead of the estimated time remaining; ``spinner=True`` adds a spinner (tasks of a few uneven
    stages). ``update(done, info)`` keeps the previous info line when ``info`` is empty, so a caller may
    update the count every step and the info line only now and then.

    One object can run several tasks one after the other (``start``/``stop``, ``start``/``stop``); a
    ``start`` while a task runs replaces that task.
    """

    def __init__(
        self,
        *,
        transient: bool = True,
        elapsed: bool = False,
        spinner: bool = False,
        console: Console | None = None,
    ) -> None:
        self.transient = transient
        self.elapsed = elapsed
        self.spinner = spinner
        self._console = console
        self._bar: _RichBar | None = None
        self._task: TaskID | None = None

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        if self._bar is None:
            self._bar = self._new_bar()
            self._bar.start()
        elif self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task(label, total=total, completed=done, info="")

    def update(self, done: int, info: str = "") -> None:
        if self._bar is None or self._task is None:
            return
        if info:
            self._bar.update(self._task, completed=done, info=info)
        else:
            self._bar.update(self._task, completed=done)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._bar = None
        self._task = None

    def _new_bar(self) -> _RichBar:
        # Imported here: rich.progress is not needed by `brn --help` or by commands that show no bar.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [SpinnerColumn()] if self.spinner else []
        columns += [
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn() if self.elapsed else TimeRemainingColumn(),
            TextColumn("{task.fields[info]}", markup=False),
        ]
        console = self._console if self._console is not None else Console(stderr=True)
        return Progress(*columns, console=console, transient=self.transient)


def progress_if(show: bool, **options: bool) -> RichProgress | None:
    """A :class:`RichProgress` with these options when `show` and stderr is a terminal, else None
    (``--json``, or stderr sent to a file or a pipe, where a bar would leave its last frame in the log)."""
    return RichProgress(**options) if show and sys.stderr.isatty() else None


def stage_counter(progress: Progress) -> Callable[[str], None]:
    """A ``step(text)`` callback for a library function that announces its stages as they begin (such as
    ``export_onnx_checked``): each call counts one more stage and shows `text` on the info line."""
    begun = 0

    def step(text: str) -> None:
        nonlocal begun
        begun += 1
        progress.update(begun, info=text)

    return step
