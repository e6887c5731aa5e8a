"""User-facing errors.

Every problem caused by the user's input (a bad file, a wrong option, an unwritable path) is raised as
:class:`BrnError`. The CLI prints its message as one line on stderr and exits non-zero; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if empty), for one-line error reports."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


class BrnError(Exception):
    """A problem with the user's input, reported as one line without a traceback.

    ``param`` names the parameter at fault as the Python API spells it (``batch_size``); the message starts
    with that name where it is the subject. The command line maps it to the flag that sets it
    (``--batch-size``), so library messages never name flags.
    """

    exit_code: int = 2

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class VerificationError(BrnError):
    """An export or a check ran but its numbers are outside the tolerance."""

    exit_code = 1
