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

from cbsd.storage.atomic import created

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h


def clone(src: Path, dst: Path) -> None:
    """Create *dst* (owner-only, must not exist) as a clone of *src*, flushed to disk.
    OSError (EOPNOTSUPP, EXDEV, ...) where the filesystem cannot: nothing is left behind."""
    fd_src = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with created(dst) as fd_dst:
            fcntl.ioctl(fd_dst, FICLONE, fd_src)
    finally:
        os.close(fd_src)


def clone_or_copy(src: Path, dst: Path) -> bool:
    """A clone where the filesystem can, else a full copy. Returns whether it was a clone."""
    try:
        clone(src, dst)
        return True
    except OSError:
        pass

    with created(dst) as fd, open(src, "rb") as fsrc, open(fd, "wb", closefd=False) as fdst:
        shutil.copyfileobj(fsrc, fdst, 8 << 20)
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
