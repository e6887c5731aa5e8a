"""The `brn` command line: parses options, calls the library, prints results.

Logic lives in the library modules; this file only translates between them and the terminal. torch is
imported inside the commands so that `brn --help` stays fast.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console

from brn_cli.errors import BrnError, first_line, render_params

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
        message = _own_message(str(exc))
        sys.stderr.write(f"brn: error: {with_flags(message, args, subject=exc.param)}\n")
        return exc.exit_code
    except Exception as exc:
        return _unexpected(exc)
    if isinstance(result, int) and not isinstance(result, bool):  # the code of a typer.Exit
        return _interrupted() if result == INTERRUPTED else result
    return 0  # the commands return None


# Library parameters that no brn option is named after (typer names an option after its function argument),
# keyed by `name`, or by `name=value` where that value has a flag of its own.
FLAG_ALIASES = {
    "num_batches": "--batches",
    "fold=False": "--no-fold",
}


def with_flags(text: str, args: Sequence[str] = (), *, subject: str | None = None) -> str:
    """A library message (see brn_cli.errors) in command-line terms: each backticked parameter becomes
    the flag that sets it on the command `args` invoke (`batch_size` -> --batch-size, `force=True` ->
    --force, `channels=3` -> --channels 3), and so does `subject`, the parameter at fault, where the
    message starts with its bare name and a space. A name no flag sets keeps its library spelling."""
    root = typer.main.get_command(app)
    options = {**_options_of(root), **_options_of(_invoked_command(root, args))}

    def spell(name: str, value: str | None) -> str:
        flag = _flag(options, name, value)
        if flag is not None:
            return flag
        return f"`{name}`" if value is None else f"`{name}={value}`"

    text = render_params(text, spell)
    if subject and re.match(rf"{re.escape(subject)}(?= |$)", text):  # not a path: data/x.npz
        flag = _flag(options, subject, None)
        text = text if flag is None else flag + text[len(subject) :]
    return text


def _invoked_command(root: Any, args: Sequence[str]) -> Any:
    """The typer (click) command that `args` name: the root group, walked down by subcommand names."""
    command = root
    for arg in args:
        if arg.startswith("-"):
            continue
        subcommands = getattr(command, "commands", None)
        if not subcommands or arg not in subcommands:
            break
        command = subcommands[arg]
    return command


def _options_of(command: Any) -> dict[str, Any]:
    """The options of `command` and of every command below it, by typer's name (the function argument's);
    where two commands share a name, the first one found."""
    found: dict[str, Any] = {}
    for sub in getattr(command, "commands", {}).values():
        found.update({k: v for k, v in _options_of(sub).items() if k not in found})
    found.update({p.name: p for p in command.params if p.opts and p.opts[0].startswith("-")})
    return found


def _flag(options: dict[str, Any], name: str, value: str | None) -> str | None:
    """How the command line spells parameter `name` (set to `value`, if given); None if no flag sets it."""
    if value is not None and f"{name}={value}" in FLAG_ALIASES:
        return FLAG_ALIASES[f"{name}={value}"]
    option = options.get(name)
    if option is None:
        flag = FLAG_ALIASES.get(name)
        return None if flag is None else flag if value is None else f"{flag} {value}"
    flag = next((o for o in option.opts if o.startswith("--")), option.opts[0])
    if getattr(option, "is_flag", False) and value in ("True", "False"):
        off = option.secondary_opts[0] if option.secondary_opts else None
        return flag if value == "True" else off
    return flag if value is None else f"{flag} {value}"


def _own_message(text: str) -> str:
    """The BrnError's own line. An error raised in a DataLoader worker comes back with the worker's traceback
    as its message ("Caught BrnError in DataLoader worker process 0 ... brn_cli.errors.BrnError: <line>"):
    its last line, without the class name, is what was raised."""
    if "\nOriginal Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith("brn_cli.") and ": " in last else last


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
