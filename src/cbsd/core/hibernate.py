"""bsuspend: hibernate (save everything, end QEMU, free the RAM), discard, and resume."""

from __future__ import annotations

from cbsd.core import savestate
from cbsd.core.context import Context
from cbsd.core.model import Action, Status, require
from cbsd.core.vm import VM
from cbsd.errors import QemuError
from cbsd.failpoints import failpoint

NAME = "hibernation"


def suspend(ctx: Context, jname: str, progress: savestate.Progress | None = None) -> str:
    with ctx.locked_vm(jname, "bsuspend") as vm:
        require(jname, vm.status(mine=True), Action.SUSPEND)
        savestate.save(vm, ctx.workdir.hibernation(jname), name=NAME, kind="hibernation",
                       keep_running=False, progress=progress)
        failpoint("suspend:saved")
        vm.power_off()
        if vm.status(mine=True) is not Status.SUSPENDED:
            raise QemuError(f"{jname}: hibernation image written but the VM is not Suspended")
    return f"{jname}: hibernated"


def discard(ctx: Context, jname: str) -> str:
    with ctx.locked_vm(jname, "bsuspend discard") as vm:
        require(jname, vm.status(mine=True), Action.DISCARD)
        savestate.drop(vm, ctx.workdir.hibernation(jname))
    return f"{jname}: hibernation image discarded"


def resume(vm: VM, *, paused: bool) -> None:
    """Load the hibernation image (lock held by the caller); drop it once the VM runs.
    A failed resume keeps the image."""
    image = vm.ctx.workdir.hibernation(vm.jname)
    savestate.load(vm, image, paused=paused)
    failpoint("resume:loaded")
    savestate.drop(vm, image)
