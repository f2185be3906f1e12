"""Guest RAM as a file, where the workdir's filesystem can clone files (vm_ramfile=auto).

QEMU maps jails-system/<jname>/ram shared (memory-backend-file, share=on), so guest RAM *is*
that file. A checkpoint then writes only CPU and device state into its stream (QEMU's
x-ignore-shared capability leaves shared RAM out) and clones the RAM file (FICLONE: metadata
only, whatever the RAM size); a restore clones the checkpoint's RAM file into place and QEMU
pages it in as the guest touches it. Checkpoints share every block the guest has not changed
between them, and restore time no longer grows with RAM.

Costs, measured (docs/benchmarks.md): the kernel writes guest RAM back to the file while the
guest runs (so a save first flushes it while the guest still runs, and the clone, which waits
for dirty pages, finds few); the first touch of each page after a restore reads it from disk.

Where the filesystem cannot clone (ext4, tmpfs) the VM keeps anonymous RAM and the full stream.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cbsd.storage import ckpstore, reflink

if TYPE_CHECKING:
    from cbsd.core.vm import VM


def flush(path: Path) -> None:
    """Write the RAM file's dirty pages back now (the guest may run meanwhile)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def place(vm: VM, ckdir: Path, m: ckpstore.Manifest) -> bool:
    """Before QEMU starts to load *m*: put the RAM it needs in place. A state saved with a RAM
    file gets a clone of it (a copy where the filesystem cannot clone; the state's own file is
    never written); a full-stream state gets a new RAM file where this VM uses one. Returns
    whether QEMU is to use the RAM file."""
    if not m.ram_file:
        return vm.fresh_ram_file()
    vm.ram_path.unlink(missing_ok=True)
    reflink.clone_or_copy(ckdir / ckpstore.RAM, vm.ram_path)
    return True
