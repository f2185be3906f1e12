"""Crash-safe file writes: temp file, fsync, rename, fsync the directory (as borgbackup does)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cbsd.detach import start_detached
from cbsd.errors import CbsdError, NoSpaceError


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: after a create or rename in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error(e, f"cannot write {path}") from e


@contextmanager
def created(path: Path) -> Iterator[int]:
    """Create *path* (owner-only; FileExistsError if anything is there: never follows or
    truncates what another process made) and give its descriptor, open for writing. When the
    block ends the file is flushed (fsync) and closed; if the block or the flush raises,
    the descriptor is closed and the file removed, so a failure leaves nothing half written
    (a kill leaves it to the caller's own recovery: a temporary name, a staging folder)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        yield fd
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree if present (used for rollback: never raises on absence)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_tree_later(path: Path) -> None:
    """Remove an already hidden tree in a detached process, after the command returns.
    Deleting a large saved state makes the kernel evict its cached pages (~0.3 s per GiB);
    the user need not wait. If that process dies, the next command's recovery finishes it."""
    start_detached(["rm", "-rf", "--", str(path)])


def os_error(e: OSError, what: str) -> CbsdError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(f"{what}: no space left on device")
    return CbsdError(f"{what}: {e.strerror or e}")
