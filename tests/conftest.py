"""Shared fixtures: running the real `brn` CLI in-process (importing torch once is what makes tests fast)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def run_cli(capsys) -> Callable[..., CliResult]:
    """Call `brn_cli.cli.app.main(argv)` as the console script would; return exit code, stdout and stderr."""
    from brn_cli.cli.app import DEBUG, main

    def run(*args: str) -> CliResult:
        capsys.readouterr()  # drop anything printed before
        DEBUG["on"] = False
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:  # pragma: no cover - main() always exits
            code = 0
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
