"""Atomic output: write to a temporary file beside the target, then rename.

A crash or a bad input never leaves a half-written file where the user expects output, and an existing
file is only replaced when the caller says so (`--force`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BrnError


def check_writable(path: str | os.PathLike, *, force: bool) -> Path:
    """Fail early (before any work) if `path` exists without `force` or its folder cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise BrnError(f"output {target} is a directory; give a file name")
    if target.exists() and not force:
        raise BrnError(f"output {target} already exists; pass --force to overwrite it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise BrnError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BrnError(f"output folder {parent} is not writable")
    return target


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder `path` (and its parents) if needed; fail with one line if it cannot be
    created or written. Whether an existing, non-empty folder may be used is the caller's decision."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise BrnError(f"output {folder} exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BrnError(f"cannot create output folder {folder} ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BrnError(f"output folder {folder} is not writable")
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto `path`.

    On any exception the temporary file is removed and `path` is left untouched.
    """
    target = check_writable(path, force=force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if target.exists() and not force:  # appeared while we worked
            raise BrnError(f"output {target} already exists; pass --force to overwrite it")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None], *, force: bool = False) -> Path:
    """Call `writer(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path, force=force) as tmp:
        writer(tmp)
    return Path(path)
