"""bsuspend: hibernate (save everything, end QEMU, free the RAM), discard, and resume."""

from __future__ import annotations

from pathlib import Path

from cbsd.core.checkpoint import load, save, tree
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.core.vm.states import delete_tags, drop_state_and_sweep, state_tags
from cbsd.errors import QemuError
from cbsd.failpoints import failpoint
from cbsd.model import Action, Status, require
from cbsd.storage import ckpstore
from cbsd.storage.atomic import remove_tree_later

NAME = "hibernation"


def suspend(ctx: Context, jname: str, progress: save.Progress | None = None) -> str:
    with ctx.locked_vm(jname, "bsuspend") as vm:
        require(jname, vm.status(mine=True), Action.SUSPEND)
        save.save(vm, ctx.workdir.hibernation(jname), name=NAME, kind="hibernation",
                  keep_running=False, progress=progress)
        failpoint("suspend:saved")
        vm.power_off()
        if vm.status(mine=True) is not Status.SUSPENDED:
            raise QemuError(f"{jname}: hibernation image written but the VM is not Suspended")
    return f"{jname}: hibernated"


def discard(ctx: Context, jname: str) -> str:
    with ctx.locked_vm(jname, "bsuspend discard") as vm:
        require(jname, vm.status(mine=True), Action.DISCARD)
        drop_state_and_sweep(vm, ctx.workdir.hibernation(jname))
    return f"{jname}: hibernation image discarded"


def resume(vm: VM, *, paused: bool | None) -> bool:
    """Load the hibernation image (lock held by the caller); *paused* None: as it was when
    hibernated. Returns whether the VM was left paused.

    The image is retired (hidden, then deleted) once QEMU holds the loaded state and before
    the guest runs again: from then on the disk moves on, and an image older than the disk
    must never be resumed. A failure before that keeps the image."""
    image = vm.ctx.workdir.hibernation(vm.jname)
    retired: list[tuple[ckpstore.Manifest, Path]] = []

    def retire(m: ckpstore.Manifest) -> None:
        retired.append((m, ckpstore.retire(image)))

    # Not a fork: the same guest continues, and never ran past the image (which is retired
    # before it runs), so it keeps its generation ID (docs/checkpoints.md).
    left_paused = load.load(vm, image, paused=paused, before_run=retire, fork=False)
    failpoint("resume:loaded")
    for m, path in retired:
        tree.set_current(vm.ctx.workdir, vm.jname, m.parent)
        remove_tree_later(path)
        delete_tags(vm, state_tags(vm, m))
    return left_paused
