"""bsnapshot: disk-only snapshots of a VM, stopped or running (docs/management.md, bsnapshot).

Each is an internal qcow2 snapshot of every image of the VM under one tag
(core/vm/snapshots.py). On a stopped or hibernated VM qemu-img makes it; on a running one QEMU
does, for all images in one QMP `transaction` (one instant across disks), while the guest's
filesystems are frozen through its agent (core/vm/fsfreeze.py) when one answers:
application-consistent, else crash-consistent, and the command says which.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cbsd.core.vm import fsfreeze, guest_agent
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.core.vm.snapshots import SNAP_PREFIX as PREFIX
from cbsd.core.vm.snapshots import holding, in_flux, pending, revert, tag
from cbsd.core.vm.states import delete_tags
from cbsd.errors import CbsdError, UsageError
from cbsd.failpoints import failpoint
from cbsd.model import Action, Status, require
from cbsd.names import check_name
from cbsd.qemu import img

CRASH_NOTE = "crash-consistent"


def default_name() -> str:
    """CBSD's snapname=gettimeofday: the local time, to the second."""
    return time.strftime("%Y%m%d%H%M%S")


def create(ctx: Context, jname: str, name: str) -> str:
    check_name(name, "snapshot name")
    with ctx.locked_vm(jname, "bsnapshot create") as vm:
        status = vm.status(mine=True)
        require(jname, status, Action.SNAPSHOT)
        if holding(vm, name):
            raise UsageError(f"{jname}: snapshot {name} exists (destroy it first, or choose "
                             "another name)")
        with pending(vm, "create", name):
            how, thaw_error = _take(vm, status, name)
            failpoint("bsnapshot:taken")
    if thaw_error:  # the snapshot stands: only the thaw is late (the guard goes on)
        raise CbsdError(f"{jname}: snapshot {name} was created, but the guest's filesystems "
                        f"could not be thawed yet ({thaw_error})")
    return f"{jname}: snapshot {name} created ({how})"


def _take(vm: VM, status: Status, name: str) -> tuple[str, str]:
    """Make the snapshot; -> (how consistent it is, in words; why the thaw failed, or '')."""
    images = vm.images()
    if not vm.alive():
        for image in images:
            img.snapshot_create(Path(image.path), tag(name))
        if status is Status.SUSPENDED:
            return (f"{CRASH_NOTE}: the VM is hibernated, the data its guest had not yet "
                    "written is in the hibernation image"), ""
        return "the VM is off", ""
    mon = vm.monitor()

    def take() -> None:
        mon.cmd("transaction", actions=[
            {"type": "blockdev-snapshot-internal-sync",
             "data": {"device": i.node, "name": tag(name)}} for i in images])

    if status is not Status.ON:
        take()
        return (f"{CRASH_NOTE}: the VM is paused, its guest agent cannot freeze its "
                "filesystems"), ""
    if not guest_agent.listening(vm):
        take()
        return (f"{CRASH_NOTE}: no guest agent answers; install qemu-guest-agent in the guest "
                "for application-consistent snapshots"), ""
    out = fsfreeze.frozen_snapshot(vm, take)
    if not out.frozen:
        return (f"{CRASH_NOTE}: the guest agent could not freeze the guest's filesystems "
                f"({out.why_not})"), out.thaw_error
    return (f"application-consistent: the guest's filesystems were frozen for "
            f"{out.seconds * 1000:.0f} ms"), out.thaw_error


def listing(ctx: Context, jname: str) -> list[dict[str, Any]]:
    """The VM's snapshots, oldest first: name, created (ISO 8601), the images holding it. One
    being created or destroyed (by a command under way, or cut short and not yet settled by
    recovery) is not listed: it never was, or no longer is, a snapshot of the VM."""
    vm = VM.load(ctx, jname)
    gone = in_flux(vm)
    found: dict[str, dict[str, Any]] = {}
    when: dict[str, tuple[int, int]] = {}
    for image in vm.images():
        if not Path(image.path).exists():
            continue
        for s in img.snapshot_list(Path(image.path)):
            t = str(s.get("name", ""))
            if not t.startswith(PREFIX) or t.removeprefix(PREFIX) == gone:
                continue
            sec = int(s.get("date-sec", 0))
            when.setdefault(t, (sec, int(s.get("date-nsec", 0))))
            row = found.setdefault(t, {
                "jname": jname, "snapname": t.removeprefix(PREFIX),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(sec)),
                "disks": []})
            row["disks"].append(image.name)
    return [found[t] for t in sorted(found, key=lambda t: when[t])]


def destroy(ctx: Context, jname: str, name: str) -> str:
    check_name(name, "snapshot name")
    with ctx.locked_vm(jname, "bsnapshot destroy") as vm:
        held = _existing(vm, name)
        with pending(vm, "destroy", name):
            delete_tags(vm, [(i, tag(name)) for i in held])
    return f"{jname}: snapshot {name} destroyed"


def destroyall(ctx: Context, jname: str) -> str:
    with ctx.locked_vm(jname, "bsnapshot destroyall") as vm:
        names = [r["snapname"] for r in listing(ctx, jname)]
        for name in names:
            with pending(vm, "destroy", name):
                delete_tags(vm, [(i, tag(name)) for i in holding(vm, name)])
    return f"{jname}: {len(names)} snapshot(s) destroyed"


def rollback(ctx: Context, jname: str, name: str) -> str:
    check_name(name, "snapshot name")
    with ctx.locked_vm(jname, "bsnapshot rollback") as vm:
        held = _existing(vm, name)
        require(jname, vm.status(mine=True), Action.ROLLBACK)
        with pending(vm, "rollback", name):
            revert(vm, name)
        untouched = [i.name for i in vm.images() if i not in held]
    extra = (f"; {', '.join(untouched)} did not exist then and kept its contents"
             if untouched else "")
    return f"{jname}: disks rolled back to snapshot {name}{extra}"


def _existing(vm: VM, name: str) -> list[Any]:
    held = holding(vm, name)
    if not held:
        raise UsageError(f"{vm.jname}: no snapshot {name} (see 'cbsd bsnapshot mode=list "
                         f"jname={vm.jname}')")
    return held
