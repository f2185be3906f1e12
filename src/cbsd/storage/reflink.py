"""Copies that share the original's blocks (FICLONE: XFS with reflink=1, btrfs), probed, never
assumed from the filesystem's name. A clone costs metadata only, whatever the file's size, and
later writes to either file go to new blocks (copy on write), so a checkpoint's RAM file and the
running guest's RAM share everything the guest has not changed since.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h


def clone(src: Path, dst: Path) -> None:
    """Create *dst* (owner-only, must not exist) as a clone of *src*, flushed to disk.
    OSError (EOPNOTSUPP, EXDEV, ...) where the filesystem cannot: nothing is left behind."""
    fd_src = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd_dst = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(fd_dst, FICLONE, fd_src)
            os.fsync(fd_dst)
        except BaseException:
            os.close(fd_dst)
            dst.unlink(missing_ok=True)
            raise
        os.close(fd_dst)
    finally:
        os.close(fd_src)


def clone_or_copy(src: Path, dst: Path) -> bool:
    """A clone where the filesystem can, else a full copy. Returns whether it was a clone."""
    try:
        clone(src, dst)
        return True
    except OSError:
        pass

    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(src, "rb") as fsrc, open(fd, "wb", closefd=False) as fdst:
            shutil.copyfileobj(fsrc, fdst, 8 << 20)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        dst.unlink(missing_ok=True)
        raise
    os.close(fd)
    return False


def can_clone(directory: Path) -> bool:
    """Whether files in *directory* can be cloned: tried on a small file, removed again."""
    probe = directory / f".reflink-probe-{os.getpid()}-{os.urandom(3).hex()}"
    copy = probe.with_name(probe.name + ".clone")
    try:
        probe.write_bytes(b"\0" * 4096)
        clone(probe, copy)
        return True
    except OSError:
        return False
    finally:
        for p in (probe, copy):
            with contextlib.suppress(OSError):
                p.unlink()
