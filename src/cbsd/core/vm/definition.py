"""The definition protocol: a VM's vm.json, the marks that make bcreate, bremove, brename and a
disk attach crash-safe, and finishing what one of them left (recovery's first step).

What cbsd deletes: only files it can prove it made. bcreate and bremove mark the VM's folder
(Workdir.unfinished) before they create or delete anything, and remove the mark last; files
of a VM that has no inventory entry and no mark are never deleted -- they may be a whole VM
whose entry was lost, and `bregister` brings it back from its vm.json.
"""

from __future__ import annotations

import json
import os

from cbsd import debug
from cbsd.core.vm.machine import VM, adopt_lost_qemu
from cbsd.core.vm.site import Site
from cbsd.failpoints import failpoint
from cbsd.model import VMSpec
from cbsd.storage.atomic import fsync_dir, remove_tree, write_atomic

RENAME_NOTE = ".rename-to"  # in the VM's folder: brename's new name, until it finished
ATTACH_MARK = ".attach-"  # .attach-FILE: an image made by an attach not yet in the definition


def save_spec_file(ctx: Site, spec: VMSpec) -> None:
    write_atomic(ctx.workdir.spec_file(spec.jname),
                 json.dumps(spec.to_dict(), indent=1, sort_keys=True).encode())


def mark_unfinished(ctx: Site, jname: str) -> None:
    write_atomic(ctx.workdir.unfinished(jname), b"")


def unmark(ctx: Site, jname: str) -> None:
    mark = ctx.workdir.unfinished(jname)
    mark.unlink(missing_ok=True)
    fsync_dir(mark.parent)


def clear_unfinished(ctx: Site, jname: str) -> None:
    """Delete the files of a bcreate or bremove that was cut short -- only under its mark."""
    wd = ctx.workdir
    if wd.unfinished(jname).exists():
        remove_tree(wd.vm_dir(jname))
        remove_tree(wd.system(jname))  # the mark goes last, with this folder


def remove_held(ctx: Site, vm: VM) -> None:
    """Delete a VM whose lock the caller holds."""
    adopt_lost_qemu(vm, scan=True)
    if vm.alive():
        vm.power_off()
    # Marked first, entry dropped next, files last: a crash anywhere leaves either a VM or
    # marked files that the next bcreate clears.
    mark_unfinished(ctx, vm.jname)
    ctx.inventory.remove(vm.jname)
    failpoint("bremove:unlisted")
    clear_unfinished(ctx, vm.jname)



def finish_rename(ctx: Site, old: str, new: str) -> None:
    """Move the folders of a VM whose inventory entry already has its new name."""
    wd = ctx.workdir
    for src, dst in ((wd.vm_dir(old), wd.vm_dir(new)), (wd.system(old), wd.system(new))):
        if src.exists() and not dst.exists():
            os.rename(src, dst)
            fsync_dir(dst.parent)
    spec = ctx.inventory.get(new)
    if spec is not None:
        save_spec_file(ctx, spec)
    (wd.system(new) / RENAME_NOTE).unlink(missing_ok=True)
    wd.lock_file(old).unlink(missing_ok=True)



def clear_unfinished_attach(ctx: Site, spec: VMSpec) -> None:
    """Recovery: an attach cut short left an image the definition does not list."""
    folder = ctx.workdir.system(spec.jname)
    try:
        marks = [e.name for e in os.scandir(folder) if e.name.startswith(ATTACH_MARK)]
    except FileNotFoundError:
        return
    for mark in marks:
        file = mark.removeprefix(ATTACH_MARK)
        if file not in spec.disks:
            ctx.workdir.disk(spec.jname, file).unlink(missing_ok=True)
        (folder / mark).unlink(missing_ok=True)


def settle(vm: VM) -> None:
    """Finish what a cut-short brename or bset left: folders still under the old name (the
    inventory entry already moved: brename's note names this VM), a stale note (the entry
    never moved), or a vm.json older than the inventory."""
    wd = vm.ctx.workdir
    note = wd.system(vm.jname) / RENAME_NOTE
    if note.exists():
        note.unlink()  # the entry still has this name: the rename never happened
    if not wd.system(vm.jname).exists():
        for other in (wd.root / "jails-system").glob(f"*/{RENAME_NOTE}"):
            if other.read_text().strip() == vm.jname:
                if debug.ON:
                    debug.log("recover", f"{vm.jname}: finishing brename from "
                              f"{other.parent.name}")
                finish_rename(vm.ctx, other.parent.name, vm.jname)
                break
    clear_unfinished_attach(vm.ctx, vm.spec)
    spec_file = wd.spec_file(vm.jname)
    try:
        on_disk = json.loads(spec_file.read_bytes())
    except (OSError, ValueError):
        on_disk = None
    if on_disk != vm.spec.to_dict() and wd.system(vm.jname).exists():
        save_spec_file(vm.ctx, vm.spec)
