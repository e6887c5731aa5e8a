"""User-facing errors.

Every problem caused by the user's input (a bad file, a wrong option, an unwritable path) is raised as
:class:`BrnError`. The CLI prints its message as one line on stderr and exits non-zero; anything else is
a bug and keeps its traceback.

Messages name parameters, never command-line flags, as the Python API spells them, in one of two ways:

* the parameter at fault, as the subject that starts the message, bare, with ``param=`` set:
  ``BrnError(f"device {spec!r} is not a device", param="device")``;
* anywhere in the message, in backticks: alone (```batch_size` must be >= 1``) or as the keyword
  argument that would fix the problem (``pass `force=True` to overwrite it``, ``pass `channels=3```).
  ``param`` then defaults to the first one; :attr:`BrnError.params` lists them all.

A library caller reads the message as it is. The command line (``brn_cli.cli.app.with_flags``) shows
each such parameter as the flag that sets it, with the value after it where one is given, and a switch
``name=True`` / ``name=False`` as its on / off flag; so neither side sees the other's spelling.
Backticks in BrnError messages are therefore reserved for parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# `name` or `name=value`: a parameter named in a message (see the module docstring).
PARAM_PATTERN = re.compile(r"`([a-z_][a-z0-9_]*)(?:=([^`]*))?`")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if empty), for one-line error reports."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def params_in(message: str) -> tuple[str, ...]:
    """The parameter names a message mentions (backticked, see the module docstring), in order, once each."""
    return tuple(dict.fromkeys(m.group(1) for m in PARAM_PATTERN.finditer(message)))


def render_params(message: str, spell: Callable[[str, str | None], str]) -> str:
    """`message` with each backticked parameter replaced by ``spell(name, value)`` (`value` is the text
    after ``=``, or None for a bare name): how a front end shows parameters in its own terms."""
    return PARAM_PATTERN.sub(lambda m: spell(m.group(1), m.group(2)), message)


class BrnError(Exception):
    """A problem with the user's input, reported as one line without a traceback.

    ``param`` names the parameter at fault as the Python API spells it (``batch_size``); by default the
    first backticked one. ``params`` lists every parameter the message names (``param`` first, hints
    included). The command line maps each to the flag that sets it, so library messages never name flags.
    """

    exit_code: int = 2

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        named = params_in(message)
        self.param = param if param is not None else (named[0] if named else None)
        self.params = tuple(dict.fromkeys(([self.param] if self.param else []) + list(named)))


class VerificationError(BrnError):
    """An export or a check ran but its numbers are outside the tolerance."""

    exit_code = 1
