"""The `brn` command line: parses options, calls the library, prints results.

Logic lives in the library modules; this file only translates between them and the terminal. torch is
imported inside the commands so that `brn --help` stays fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from brn_cli.errors import BrnError, first_line

app = typer.Typer(
    name="brn",
    help="Batch Renormalization for existing PyTorch BatchNorm models: inspect, convert, fine-tune, "
    "calibrate, evaluate and export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
export_app = typer.Typer(
    help="Export a checkpoint: ONNX (folded, verified) or a plain BatchNorm state_dict.", no_args_is_help=True
)
app.add_typer(export_app, name="export")

# Piped output is not truncated to 80 columns: tables stay readable in logs and CI.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)
DEBUG = {"on": False}


def _print_version(value: bool) -> None:
    if value:
        from brn_cli._version import __version__

        sys.stdout.write(f"brn {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        # Eager: handled while the options are parsed, so it needs no command (a plain option of the group
        # callback would only run once a command is given: "Missing command.").
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Global options. Add --debug anywhere to see tracebacks."""


# ----------------------------------------------------------------------------------------------
# inspect / convert
# ----------------------------------------------------------------------------------------------


ChannelsOpt = Annotated[
    int | None,
    typer.Option(
        "--channels",
        help="Image folders: load images as 1 (grayscale) or 3 (RGB) channels (default: the input channels of "
        "the model's first convolution, else 3).",
    ),
]


# ----------------------------------------------------------------------------------------------
# finetune (finetune and distributed modules)
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# export onnx / export state-dict (fold, export, statedict modules)
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# demo / reproduce / bench
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# sample-data
# ----------------------------------------------------------------------------------------------


INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


def main(argv: list[str] | None = None) -> None:
    """Console entry: runs the app and exits with one code for every way out of it.

    Usage errors: typer's usage message, exit 2. BrnError: one line `brn: error: ...`, its exit code. Ctrl-C:
    `brn: interrupted`, exit 130. Any other exception: one line naming it, exit 1. `--debug` (anywhere on the
    line) re-raises instead, for the traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        DEBUG["on"] = True
        args = [a for a in args if a != "--debug"]
    sys.exit(_run_app(args))


def _run_app(args: list[str]) -> int:
    try:
        # standalone_mode=False: typer raises usage errors and typer.Abort instead of printing and exiting,
        # and *returns* the code of a typer.Exit -- including the Exit(130) it makes of a KeyboardInterrupt.
        result = app(args=args, prog_name="brn", standalone_mode=False)
    except KeyboardInterrupt:  # one that arrives outside typer's own handling
        return _interrupted()
    except typer.Abort as exc:
        if isinstance(exc.__cause__, EOFError):
            # typer reads EOFError as end of input at a prompt; brn has no prompts, so a file ended early.
            return _unexpected(exc.__cause__)
        return _interrupted()
    except typer.TyperException as exc:  # usage errors: typer's own message (usage line, hint, "Error: ...")
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            sys.stderr.write(f"Error: {exc.format_message()}\n")
        return exc.exit_code
    except BrnError as exc:
        if DEBUG["on"]:
            raise
        sys.stderr.write(f"brn: error: {exc}\n")
        return exc.exit_code
    except Exception as exc:
        return _unexpected(exc)
    if isinstance(result, int) and not isinstance(result, bool):  # the code of a typer.Exit
        return _interrupted() if result == INTERRUPTED else result
    return 0  # the commands return None


def _interrupted() -> int:
    sys.stderr.write("brn: interrupted\n")
    return INTERRUPTED


def _unexpected(exc: BaseException) -> int:
    if DEBUG["on"]:
        raise exc
    sys.stderr.write(
        f"brn: error: {type(exc).__name__}: {first_line(exc)} (run with --debug for the traceback)\n"
    )
    return 1
