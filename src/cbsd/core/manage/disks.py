"""bhyve-dsk: a stopped VM's disks -- list, attach (a new image, or one detached before),
detach.

Checkpoints cover every disk (each holds an internal snapshot of every image), so a disk
that a saved state holds a snapshot of cannot be detached: that state could never be
restored without it. A detached disk's image stays in the VM's folder (cbsd deletes no data
on detach); bremove deletes it with the VM.

A disk is a self-contained qcow2 named NAME.qcow2 that is none of the files cbsd itself keeps
in the VM's folder (own_files: the UEFI variable store, the cloud-init seed, boot media): an
attach, a bimport and every launch check so (qemu/img.py), so no disk is ever another file of
the VM, or an image whose header makes QEMU open a host file.

An attach is marked (.attach-NAME in the VM's folder) while the new image exists but the
VM's definition does not list it yet; recovery deletes such an image, which only cbsd made.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from cbsd.core.vm.context import Context
from cbsd.core.vm.definition import ATTACH_MARK, save_spec_file
from cbsd.core.vm.machine import EFI_VARS, qcow2_virtual_size
from cbsd.errors import StateError, UsageError
from cbsd.failpoints import failpoint
from cbsd.model import BOOT_MEDIA, Action, VMSpec, require
from cbsd.names import check_name, format_size
from cbsd.qemu import img
from cbsd.qemu.argv import default_controller
from cbsd.storage import ckpstore
from cbsd.storage.atomic import fsync_dir, write_atomic
from cbsd.storage.paths import Workdir

DISK_SUFFIX = ".qcow2"


def own_files(wd: Workdir, jname: str) -> set[str]:
    """The files cbsd itself keeps in a VM's folder beside its disks (none may be a disk)."""
    return {EFI_VARS, wd.seed(jname).name, *(f"boot-{m}" for m in BOOT_MEDIA)}


def disk_file_problem(wd: Workdir, jname: str, file: str) -> str | None:
    """Why *file* cannot be one of the VM's disks, or None."""
    if not isinstance(file, str):  # a definition from outside can hold anything
        return f"{file!r} is not a disk's file name (NAME{DISK_SUFFIX})"
    if file in own_files(wd, jname):
        return f"{file} is cbsd's own file of the VM, not a disk"
    try:
        if file.endswith(DISK_SUFFIX):
            check_name(file.removesuffix(DISK_SUFFIX), "dsk_name")
            return None
    except UsageError:
        pass
    return f"{file} is not a disk's file name (NAME{DISK_SUFFIX})"


def _size(path: Path) -> int:
    return qcow2_virtual_size(str(path))


def listing(ctx: Context, jname: str) -> list[dict[str, Any]]:
    spec = ctx.spec(jname)
    return [{"dsk_name": name.removesuffix(".qcow2"), "file": name,
             "dsk_size": format_size(_size(ctx.workdir.disk(jname, name))),
             "dsk_controller": spec.disk_controllers.get(name) or default_controller(spec)}
            for name in spec.disks]


def attach(ctx: Context, jname: str, size: int | None, controller: str | None,
           name: str | None) -> str:
    wd = ctx.workdir
    with ctx.locked_vm(jname, "bhyve-dsk attach") as vm:
        require(jname, vm.status(mine=True), Action.DISKS)
        spec = vm.spec
        file = f"{name}{DISK_SUFFIX}" if name else _next_name(ctx, spec)
        why = disk_file_problem(wd, jname, file)
        if why:
            raise UsageError(f"{jname}: dsk_name={name}: {why}")
        if file in spec.disks:
            raise StateError(f"{jname}: {file.removesuffix('.qcow2')} is attached already")
        path = wd.disk(jname, file)
        reattach = path.exists()
        if not reattach and size is None:
            raise UsageError("bhyve-dsk: mode=attach needs dsk_size= (e.g. dsk_size=10g)")
        if reattach and size is not None:
            raise StateError(f"{jname}: {path} exists (a disk detached earlier): attach it "
                             "without dsk_size=, or pick another dsk_name=")
        controller = controller or ("virtio-blk" if spec.os_type in ("linux", "freebsd")
                                    else "ahci")
        mark = wd.system(jname) / f"{ATTACH_MARK}{file}"
        if reattach:
            img.check(path, f"{jname}: {path}")
        else:
            write_atomic(mark, b"")
            assert size is not None
            img.create(path, size)
            failpoint("bhyve-dsk:created")
        new = dataclasses.replace(spec, disks=[*spec.disks, file],
                                  disk_controllers={**spec.disk_controllers, file: controller})
        ctx.inventory.update_spec(new)
        save_spec_file(ctx, new)
        mark.unlink(missing_ok=True)
        fsync_dir(mark.parent)
    if controller == "nvme":
        # Measured on QEMU 7.2 and 10.0: migrate fails with "State blocked by
        # non-migratable device ... nvme".
        print(f"{jname}: note: QEMU cannot save the state of an NVMe controller, so this VM "
              "cannot be checkpointed or hibernated while the disk is attached (virtio-blk "
              "and ahci can)", file=sys.stderr)
    what = "re-attached" if reattach else f"attached ({format_size(size or 0)}, {controller})"
    return f"{jname}: {file.removesuffix('.qcow2')} {what}"


def _next_name(ctx: Context, spec: VMSpec) -> str:
    n = 2
    while (f"dsk{n}.qcow2" in spec.disks
           or ctx.workdir.disk(spec.jname, f"dsk{n}.qcow2").exists()):
        n += 1
    return f"dsk{n}.qcow2"


def detach(ctx: Context, jname: str, name: str) -> str:
    check_name(name, "dsk_name")
    file = f"{name}.qcow2"
    wd = ctx.workdir
    with ctx.locked_vm(jname, "bhyve-dsk detach") as vm:
        require(jname, vm.status(mine=True), Action.DISKS)
        if file not in vm.spec.disks:
            raise StateError(f"{jname}: no disk {name} (see 'cbsd bhyve-dsk mode=list "
                             f"jname={jname}')")
        holders = [m.name if m.kind == "checkpoint" else "the hibernation image"
                   for _, m in ckpstore.list_states(wd.checkpoints(jname))
                   if m is not None and any(s.disk == file for s in m.disk_snapshots)]
        if holders:
            raise StateError(f"{jname}: checkpoint(s) {', '.join(holders)} hold a snapshot of "
                             f"{name} and could not be restored without it: destroy them "
                             "first (bcheckpoint mode=destroy)")
        spec = vm.spec
        controllers = {k: v for k, v in spec.disk_controllers.items() if k != file}
        new = dataclasses.replace(spec, disks=[d for d in spec.disks if d != file],
                                  disk_controllers=controllers)
        ctx.inventory.update_spec(new)
        save_spec_file(ctx, new)
    return (f"{jname}: {name} detached; its image stays at {wd.disk(jname, file)} "
            f"(attach it again with dsk_name={name}, or delete it)")


