"""How long-running library functions report progress, without knowing the terminal.

A library function takes ``progress: Progress | None``. The command line passes a Rich renderer
(``brn_cli.cli.progress.RichProgress``); library users pass their own object, or nothing. The protocol is
three calls, so a logger, a tqdm bar or a test recorder fits it in a few lines.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """Receives the progress of one task: ``start`` once, ``update`` any number of times, ``stop`` once."""

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        """A task named ``label`` begins: ``total`` units (None: unknown), ``done`` of them already done."""

    def update(self, done: int, info: str = "") -> None:
        """``done`` units are complete; ``info`` is a short status line (loss, accuracy, limits)."""

    def stop(self) -> None:
        """The task ended (finished, failed or interrupted)."""


class NullProgress:
    """Reports nothing: the default wherever no progress object is given."""

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        pass

    def update(self, done: int, info: str = "") -> None:
        pass

    def stop(self) -> None:
        pass


def or_null(progress: Progress | None) -> Progress:
    """``progress``, or a reporter that does nothing."""
    return NullProgress() if progress is None else progress
