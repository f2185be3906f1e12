"""bsnapshot's disk snapshots: their tags in the VM's images, and finishing one cut short.

A bsnapshot is an internal qcow2 snapshot of every image of the VM (its disks and UEFI
variable store) under one tag, SNAP_PREFIX + its name: the mechanism checkpoints use for their
disk state (core/checkpoint/save.py), under another prefix, so that neither ever takes the
other's snapshots for its own (recovery sweeps only unowned TAG_PREFIX ones). Internal
snapshots are independent of each other: reverting an image to one leaves every other
snapshot, a checkpoint's or a bsnapshot's, as it was.

An operation on several images is not atomic by itself (a stopped VM's images are changed one
qemu-img call at a time), so each writes its intent, jails-system/VM/bsnapshot.pending, first
and deletes it last; recovery, before the next locked command, finishes it (`settle`):
a create is undone (it never reported success), a destroy or a rollback is completed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from cbsd import debug
from cbsd.core.vm.machine import VM, Image
from cbsd.core.vm.states import delete_tags
from cbsd.errors import CbsdError
from cbsd.failpoints import failpoint
from cbsd.qemu import img
from cbsd.storage.atomic import write_atomic

SNAP_PREFIX = "bsnapshot-"
PENDING = "bsnapshot.pending"


def tag(name: str) -> str:
    return f"{SNAP_PREFIX}{name}"


def holding(vm: VM, snap: str) -> list[Image]:
    """The VM's images that hold snapshot *snap* (by name)."""
    t = tag(snap)
    return [i for i in vm.images() if Path(i.path).exists()
            and t in img.snapshots(Path(i.path))]


def any_held(vm: VM) -> bool:
    """Whether any image of the VM holds a bsnapshot (bmigrate's mirror cannot carry one)."""
    return any(t.startswith(SNAP_PREFIX) for i in vm.images() if Path(i.path).exists()
               for t in img.snapshots(Path(i.path)))


@contextmanager
def pending(vm: VM, op: str, snap: str) -> Iterator[None]:
    """Mark *op* on *snap* as under way while the block runs. If the block fails, it is
    finished at once as recovery would finish it after a kill -9 (settle); if even that
    fails, the mark stays for the next command's recovery. The block's error is reported."""
    path = vm.ctx.workdir.system(vm.jname) / PENDING
    write_atomic(path, json.dumps({"op": op, "snap": snap}).encode())
    try:
        yield
    except BaseException:
        with suppress(CbsdError, OSError):
            settle(vm)
        raise
    path.unlink(missing_ok=True)


def _mark(vm: VM) -> tuple[str, str] | None:
    """(op, snapshot) of the operation under way or cut short, if any and readable."""
    try:
        mark = json.loads((vm.ctx.workdir.system(vm.jname) / PENDING).read_bytes())
        return str(mark["op"]), str(mark["snap"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def in_flux(vm: VM) -> str | None:
    """The snapshot a create or destroy under way (or cut short) is about: not one to list."""
    mark = _mark(vm)
    return mark[1] if mark and mark[0] in ("create", "destroy") else None


def settle(vm: VM) -> None:
    """Finish the operation a command died in (its mark): a create is undone, a destroy
    or a rollback completed."""
    path = vm.ctx.workdir.system(vm.jname) / PENDING
    if not path.exists():
        return
    mark = _mark(vm)
    if mark is None:
        path.unlink(missing_ok=True)  # unreadable: nothing to finish by it
        return
    op, snap = mark
    if debug.ON:
        debug.log("recover", f"{vm.jname}: finishing an interrupted bsnapshot {op} of {snap}")
    if op == "rollback":
        if vm.alive():
            raise CbsdError(f"{vm.jname}: a rollback to snapshot {snap} was cut short, but "
                            "the VM runs: stop it, and the next command finishes it")
        revert(vm, snap)
    else:  # create (undone) or destroy (finished)
        delete_tags(vm, [(i, tag(snap)) for i in holding(vm, snap)])
    path.unlink(missing_ok=True)


def revert(vm: VM, snap: str) -> None:
    """Every image that holds *snap* back to it (the VM stopped)."""
    for image in holding(vm, snap):
        img.snapshot_apply(Path(image.path), tag(snap))
        failpoint("bsnapshot:reverted-one")
