"""Free space for guest RAM kept in a file (core/vm/ramfile.py): never arm a SIGBUS.

QEMU maps the RAM file shared. Every guest write to a page whose block is shared with a
checkpoint's clone (or that has no block yet) makes the filesystem allocate one at that moment,
inside the page fault; with none left the kernel sends SIGBUS and QEMU dies with everything
since the last checkpoint. Nothing in userspace can hand a block over at fault time, so:

- a RAM file that does not come from a clone is allocated whole before QEMU starts
  (fallocate): that VM's writes never need a new block, whatever fills the filesystem later;
- an operation that leaves a running VM's RAM sharing blocks (checkpoint create, restore,
  resume) is admitted only while the filesystem's free space covers what *every* running
  RAM-file VM on it may still need, plus what the operation adds; otherwise it is refused
  (NoSpaceError, exit 1) before anything changed, naming the space needed and free.

What a running RAM file may still need is measured, not guessed: its size minus the bytes in
extents that are its own (FIEMAP: allocated, delayed or unwritten, and not shared). That is
exact on XFS, where writing a block a file owns alone rewrites it in place. On other
filesystems (btrfs writes every block anew) the whole size is counted, which is the best
bound userspace can give there, not a guarantee.

The space is checked, not held: a writer that is not cbsd (a guest's disk image growing, the
user's files) can still take it after the check (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Mapping
from pathlib import Path

from cbsd.errors import NoSpaceError
from cbsd.qemu.argv import RAM_FILE_OPTION
from cbsd.storage.paths import free_bytes

MiB = 1 << 20
XFS_MAGIC = 0x58465342
# Allocating in 4 KiB pieces also grows the file's extent map and the refcount btree. Measured
# on a 1 GiB XFS: after a checkpoint, the guest rewriting 188 MiB of its 192 MiB RAM file took
# 190 MiB of free space. The 1/64 scales that with RAM; the slack covers the small cases and
# the checkpoint's own files (test_ramfile_space.py: admitted with this and 1 MiB more, a
# guest rewriting all it had filled lived on).
SLACK = 16 * MiB
STREAM = 4 * MiB  # a RAM-file checkpoint's own files: device state and manifest

_FS_IOC_FIEMAP = 0xC020660B
_HEADER = struct.Struct("=QQIIII")      # struct fiemap, without its extents
_EXTENT = struct.Struct("=QQQ16xI12x")  # struct fiemap_extent: logical, physical, length, flags
_LAST, _SHARED = 0x1, 0x2000
_BATCH = 512


def required(needs: Mapping[str, int], adds: int) -> int:
    """Free bytes an operation needs (pure): what every other running RAM file on the
    filesystem may still take (*needs*, by VM), what the operation itself adds, the slack."""
    total = sum(needs.values()) + adds
    return total + total // 64 + SLACK


def refusal(what: str, free: int, needs: Mapping[str, int], adds: int,
            where: Path) -> str | None:
    """Why *what* must not happen with *free* bytes free, or None if it may (pure)."""
    need = required(needs, adds)
    if free >= need:
        return None
    others = sum(needs.values())
    held = (f" ({_mib(others)} MiB of it for the RAM of running VMs {', '.join(sorted(needs))})"
            if others else "")
    return (f"no space for guest RAM in a file: {what} needs {_mib(need)} MiB free in "
            f"{where}{held}, {_mib(free)} MiB free (a guest writing its RAM on a full "
            "filesystem is killed); free space, stop a VM, or set vm_ramfile=off")


def _mib(n: int) -> int:
    return -(-n // MiB)


def own_bytes(path: Path, size: int) -> int:
    """Bytes of *path*'s first *size* in extents it owns alone (allocated, delayed or
    unwritten, not shared); 0 where FIEMAP cannot tell."""
    own, start = 0, 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        while True:
            buf = bytearray(_HEADER.size + _EXTENT.size * _BATCH)
            _HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, 0, 0, _BATCH, 0)
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
            mapped = _HEADER.unpack_from(buf)[3]
            last = False
            for i in range(mapped):
                logical, _, length, flags = _EXTENT.unpack_from(buf, _HEADER.size
                                                                + i * _EXTENT.size)
                if not flags & _SHARED:  # preallocation past the end counts for nothing
                    own += max(0, min(logical + length, size) - logical)
                start = logical + length
                last = bool(flags & _LAST)
            if last or mapped == 0:
                return own
    except OSError:
        return 0
    finally:
        os.close(fd)


def still_needed(path: Path) -> int:
    """What the guest writing all of *path* may still allocate (see the module docstring)."""
    try:
        size = path.stat().st_size
    except OSError:
        return 0
    if _fs_magic(path) != XFS_MAGIC:
        return size
    return max(0, size - own_bytes(path, size))


def _fs_magic(path: Path) -> int:
    """The filesystem's type: statfs(2)'s f_type (its first field), which os.statvfs lacks."""
    # lazy: ctypes is heavy: only a statfs of the RAM folder needs it
    import ctypes

    buf = ctypes.create_string_buffer(120)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return 0
    return int(struct.unpack_from("=q", buf.raw)[0])


def running_ram_files(directory: Path) -> dict[Path, str]:
    """The RAM files of every running QEMU (any workdir) on *directory*'s filesystem, each
    with the VM it belongs to (jails-system/<jname>/ram)."""
    dev = os.stat(directory).st_dev
    found: dict[Path, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        for arg in argv:
            if arg.startswith(RAM_FILE_OPTION) and (path := _mem_path(arg)) is not None:
                with contextlib.suppress(OSError):
                    if path.stat().st_dev == dev:
                        found[path] = path.parent.name
    return found


def _mem_path(arg: bytes) -> Path | None:
    """mem-path= of a -object memory-backend-file,... value (',,' is an escaped ',')."""
    parts = arg.replace(b",,", b"\0").split(b",")
    for part in parts:
        if part.startswith(b"mem-path="):
            return Path(os.fsdecode(part[len(b"mem-path="):].replace(b"\0", b",")))
    return None


def admit(jname: str, what: str, ram: Path, adds: int) -> None:
    """Refuse *what* (NoSpaceError) unless the filesystem of *ram* (this VM's RAM file, which
    may not exist yet) has room for every other running RAM file's need and *adds*."""
    where = ram.parent
    needs: dict[str, int] = {}
    for path, owner in running_ram_files(where).items():
        if path != ram and (n := still_needed(path)):
            needs[owner] = needs.get(owner, 0) + n
    why = refusal(what, free_bytes(where), needs, adds, where)
    if why is not None:
        raise NoSpaceError(f"{jname}: {why}")

