"""Guest RAM as a file, where the workdir's filesystem can clone files (vm_ramfile=auto).

QEMU maps jails-system/<jname>/ram shared (memory-backend-file, share=on), so guest RAM *is*
that file. A checkpoint then writes only CPU and device state into its stream (QEMU's
x-ignore-shared capability leaves shared RAM out) and clones the RAM file (FICLONE: metadata
only, whatever the RAM size); a restore clones the checkpoint's RAM file into place and QEMU
pages it in as the guest touches it. Checkpoints share every block the guest has not changed
between them, and restore time no longer grows with RAM.

Costs, measured (docs/benchmarks/): the kernel writes guest RAM back to the file while the
guest runs (so a save first flushes it while the guest still runs, and the clone, which waits
for dirty pages, finds few); the first touch of each page after a restore reads it from disk.

Where the filesystem cannot clone (ext4, tmpfs) the VM keeps anonymous RAM and the full stream.

A guest writing its RAM file on a full filesystem is killed (SIGBUS): a new RAM file is
allocated whole, and every step that leaves a running VM's RAM sharing blocks with a clone is
first admitted against the free space (core/vm/ramspace.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cbsd.core.vm import ramspace
from cbsd.errors import NoSpaceError
from cbsd.storage import ckpstore, reflink
from cbsd.storage.paths import free_bytes

if TYPE_CHECKING:
    from cbsd.core.vm.machine import VM


def flush(path: Path) -> None:
    """Write the RAM file's dirty pages back now (the guest may run meanwhile)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def fresh(vm: VM) -> bool:
    """Before a launch that brings no RAM file of its own: remove a stale one (never reused:
    it holds an earlier run's memory) and say whether this launch should use one."""
    vm.ram_path.unlink(missing_ok=True)
    if vm.spec.ram_file != "auto" or not reflink.can_clone(vm.ram_path.parent):
        return False
    allocate(vm)
    return True


def place(vm: VM, ckdir: Path, m: ckpstore.Manifest) -> bool:
    """Before QEMU starts to load *m*: put the RAM it needs in place. A state saved with a RAM
    file gets a clone of it (a copy where the filesystem cannot clone; the state's own file is
    never written); a full-stream state gets a new RAM file where this VM uses one. Returns
    whether QEMU is to use the RAM file."""
    if not m.ram_file:
        return fresh(vm)
    vm.ram_path.unlink(missing_ok=True)
    source = ckdir / ckpstore.RAM
    what = "a restore" if m.kind == "checkpoint" else "a resume from hibernation"
    with _admitting(vm, what, source.stat().st_size):
        reflink.clone_or_copy(source, vm.ram_path)
    return True


def allocate(vm: VM) -> None:
    """A new RAM file for a launch, allocated whole (fallocate: metadata, unwritten extents)
    so that the guest never needs a block the filesystem no longer has."""
    what = "a start with its RAM in a file"
    with _admitting(vm, what, vm.spec.ram):
        fd = os.open(vm.ram_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, vm.spec.ram)
        except OSError as e:
            vm.ram_path.unlink(missing_ok=True)
            if e.errno != errno.ENOSPC:
                raise
            raise NoSpaceError(f"{vm.jname}: no space for guest RAM in a file: {what} needs "
                               f"{vm.spec.ram >> 20} MiB in {vm.ram_path.parent}, "
                               f"{free_bytes(vm.ram_path.parent) >> 20} MiB free") from e
        finally:
            os.close(fd)


def admit_checkpoint(vm: VM) -> None:
    """Before a checkpoint that leaves the VM running: refuse it while the space its RAM
    could need once shared with the clone is not free (nothing done yet)."""
    ramspace.admit(vm.jname, "a checkpoint of a running VM", vm.ram_path, _checkpoint_adds(vm))


def clone_for_checkpoint(vm: VM, dest: Path, *, stays_running: bool) -> None:
    """Clone the running VM's RAM file into a checkpoint, admitted again under the workdir's
    lock if the VM runs on afterwards (another VM may have started since admit_checkpoint)."""
    if not stays_running:
        reflink.clone(vm.ram_path, dest)
        return
    with _admitting(vm, "a checkpoint of a running VM", _checkpoint_adds(vm)):
        reflink.clone(vm.ram_path, dest)


def _checkpoint_adds(vm: VM) -> int:
    """After the clone every block of the RAM file is shared: all of it may be needed."""
    return vm.ram_path.stat().st_size + ramspace.STREAM


@contextlib.contextmanager
def _admitting(vm: VM, what: str, adds: int) -> Iterator[None]:
    """Admission and the step it admits as one, for the commands of one workdir: two VMs
    started at once must not both count the same free space."""
    with vm.ctx.lock(LOCK, "guest RAM space check", wait=30, vm=False):
        ramspace.admit(vm.jname, what, vm.ram_path, adds)
        yield


LOCK = ".ram-space"  # a lock name no VM can have (names start with a letter or digit)
