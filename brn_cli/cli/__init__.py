"""The `brn` command line: typer app, shared options, one module per command group.

Only this package (and recipes/) knows typer, Rich and flag names; the library reports through
callbacks and raises errors that name parameters."""

from __future__ import annotations

import importlib

from brn_cli.cli.app import DEBUG, app, main

# Each module registers its commands on `app` when imported; this order is the order of `brn --help`.
COMMAND_MODULES = (
    "model",
    "schedule",
    "evaluation",
    "finetune",
    "export",
    "recipes",
)
for _name in COMMAND_MODULES:
    importlib.import_module(f"brn_cli.cli.{_name}")

__all__ = ["DEBUG", "app", "main"]
