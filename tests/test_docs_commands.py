"""The command lines of README.md, docs/quickstart.md and docs/tasks.md run as written.

Every line beginning with `brn ` in a fenced bash/console block is run, in the document's order, in an empty
folder (each document in its own), through the real entry point `brn_cli.cli.app.main` -- the console script's
code path, in-process so that torch is imported once. Each line must exit 0 with the files the lines before
it wrote.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/quickstart.md", "docs/tasks.md"]
SHELL_FENCES = {"bash", "sh", "shell", "console"}


def fenced_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, fence language, line) for every line inside a fenced code block, continuations joined."""
    found: list[tuple[int, str, str]] = []
    fence: str | None = None
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            match = re.match(r"^\s*```\s*([\w-]*)", line)
            if match:
                fence = match.group(1).lower()
            continue
        if re.match(r"^\s*```\s*$", line):
            fence = None
            continue
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1].rstrip())
            continue
        found.append((number, fence, line))
    return found


def brn_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each `brn ...` line in a shell block (a console `$ ` prompt is dropped)."""
    lines = []
    for number, fence, line in fenced_lines(text):
        if fence not in SHELL_FENCES:
            continue
        command = line.strip()
        if fence == "console":
            if not command.startswith("$ "):
                continue  # output
            command = command[2:].strip()
        if command.startswith("brn "):
            lines.append((number, command))
    return lines


def unfenced_brn_lines(text: str) -> list[tuple[int, str]]:
    """Indented code lines (outside fences) that look like a command: they would escape the run below."""
    inside = {number for number, _, _ in fenced_lines(text)}
    return [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if number not in inside and re.match(r"^( {4,}|\t)(\$ )?brn ", line)
    ]


def test_the_extraction_reads_fences_prompts_and_continuations():
    text = (
        "    brn indented --x\n"
        "```bash\n"
        "python -m venv .venv && brn demo\n"
        "brn one --a 1   # comment\n"
        "brn two \\\n"
        "    --b 2\n"
        "```\n"
        "```python\n"
        "brn = 1\n"
        "```\n"
        "```console\n"
        "$ brn three\n"
        "brn output line\n"
        "```\n"
    )
    assert brn_lines(text) == [(4, "brn one --a 1   # comment"), (5, "brn two --b 2"), (12, "brn three")]
    assert unfenced_brn_lines(text) == [(1, "    brn indented --x")]


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_line_is_in_a_shell_block(doc):
    text = (REPO / doc).read_text(encoding="utf-8")
    assert brn_lines(text), f"{doc} shows no brn command"
    assert unfenced_brn_lines(text) == [], f"{doc}: put command lines in a ```bash block so that they are run"


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS)
def test_every_command_line_runs_as_written(doc, run_cli, tmp_path, monkeypatch):
    import torch

    lines = brn_lines((REPO / doc).read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        for number, command in lines:
            args = shlex.split(command, comments=True)
            res = run_cli(*args[1:])
            assert res.code == 0, f"{doc}:{number}: `{command}` exited {res.code}:\n{res.err}"
    finally:
        torch.set_num_threads(threads)
