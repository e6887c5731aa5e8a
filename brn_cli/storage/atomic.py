"""Atomic output: write to a temporary file beside the target, then rename; and a folder lock.

A crash or a bad input never leaves a half-written file where the user expects output, and an existing
file is only replaced when the caller says so (``force=True``). Outputs get the mode a plain ``open()`` would
give them (0666 less the umask), not mkstemp's 0600. A temporary file is named ``.NAME.PID.XXXXXXXX.tmp``:
one left behind by a killed writer (its PID no longer runs) is removed by the next write of NAME.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from brn_cli.errors import BrnError

LOCK_NAME = ".brn.lock"
LEGACY_TEMP_AGE_S = 3600.0  # temporaries named without a PID (older brn): removed once this old


def check_writable(path: str | os.PathLike, *, force: bool) -> Path:
    """Fail early (before any work) if `path` exists without `force` or its folder cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise BrnError(f"output {target} is a directory; give a file name")
    if target.exists() and not force:
        raise BrnError(f"output {target} already exists; pass `force=True` to overwrite it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise BrnError(f"output folder {parent} does not exist")
    if not parent.is_dir():
        raise BrnError(f"output folder {parent} is not a folder")
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
    remove_stale_temps(target)
    tmp = make_temp(target)
    try:
        yield tmp
        if target.exists() and not force:  # appeared while we worked
            raise BrnError(f"output {target} already exists; pass `force=True` to overwrite it")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def current_umask() -> int:
    """The process umask: read from /proc where there is one (setting it to read it, the portable way,
    would briefly change it for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp(target: Path, *, suffix: str = ".tmp") -> Path:
    """An empty file ``.NAME.PID.XXXXXXXX.tmp`` beside `target`, with the mode `target` would get."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=suffix, dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(name)


@contextlib.contextmanager
def temp_dir(target: Path, *, suffix: str) -> Iterator[Path]:
    """A private folder ``.NAME.PID.XXXXXXXX<suffix>`` beside `target`, removed with its contents on exit."""
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=suffix, dir=target.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pid_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(target: Path, *, suffix: str = ".tmp") -> list[Path]:
    """Remove the temporaries of `target` (``.NAME.PID.XXXXXXXX<suffix>``) whose writer no longer runs.

    Only names made by :func:`make_temp` / :func:`temp_dir` for this very target are considered; a name
    without a PID (older brn) goes once it is an hour old. Returns what was removed.
    """
    pattern = re.compile(re.escape(f".{target.name}.") + r"(?:(\d+)\.)?[^.]+" + re.escape(suffix))
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink():
            continue
        pid = match.group(1)
        try:
            stale = (
                not pid_is_running(int(pid))
                if pid is not None
                else time.time() - entry.stat().st_mtime > LEGACY_TEMP_AGE_S
            )
            if stale and entry.is_dir():
                shutil.rmtree(entry.path)
            elif stale:
                os.unlink(entry.path)
            if stale:
                removed.append(Path(entry.path))
        except (OSError, ValueError):  # gone already, or not ours to remove
            continue
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, what: str = "folder") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (``flock`` on ``folder/.brn.lock``) while the block runs.

    Another process holding it: BrnError naming the folder and that process's PID. The kernel drops the
    lock when its holder exits, however it exits, so a lock file left behind blocks nothing. The file is
    never deleted (a process could be waiting on its inode).
    """
    import fcntl

    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise BrnError(f"cannot lock {what} {folder} ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without locks
                sys.stderr.write(
                    f"note: {folder}'s file system cannot lock files; nothing stops a second run\n"
                )
                yield path
                return
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BrnError(f"cannot lock {what} {folder} ({exc.strerror or exc})") from None
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f"another brn process (pid {holder})" if holder.isdigit() else "another brn process"
            raise BrnError(f"{what} {folder} is in use by {who}; wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None], *, force: bool = False) -> Path:
    """Call `writer(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path, force=force) as tmp:
        writer(tmp)
    return Path(path)
