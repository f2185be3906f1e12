"""bcreate, bstart, bstop, bremove, bpause: the VM lifecycle and its state transitions."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from cbsd.core.context import Context
from cbsd.core.model import Action, Status, VMSpec, require
from cbsd.core.names import MIB, check_name
from cbsd.core.pause import switch
from cbsd.core.vm import VM
from cbsd.errors import QemuError, StateError, UsageError
from cbsd.qemu import img, process
from cbsd.qemu.host import resolve_machine
from cbsd.storage.atomic import remove_tree

FIRST_DISK = "dsk1.qcow2"


DEFAULT_IMGSIZE = 10 << 30


def _validate(spec: VMSpec, image: str | None) -> None:
    check_name(spec.jname)
    if spec.ram < 16 * MIB:
        raise UsageError(f"vm_ram={spec.ram >> 20}m is under 16 MiB: a likely mistake "
                         "(sizes take a suffix, e.g. vm_ram=512m)")
    for key, value in (("image", image), ("iso", spec.iso), ("kernel", spec.kernel),
                       ("initrd", spec.initrd)):
        if value is not None and not Path(value).is_file():
            raise UsageError(f"{key}: no such file: {value}")
    if (spec.initrd or spec.cmdline) and not spec.kernel:
        raise UsageError("initrd= and cmdline= need kernel=")
    if spec.vnc_password and not spec.vnc:
        raise UsageError("vnc_password= needs vnc=1")
    if spec.hostfwd and spec.nic != "user":
        raise UsageError("hostfwd= needs nic=user")


def create(ctx: Context, spec: VMSpec, *, imgsize: int | None = None,
           image: str | None = None) -> VMSpec:
    """Define a VM from *spec* (its disks and machine type are filled in here): its first disk
    is *image* converted to qcow2 (grown to *imgsize* if larger), or a new empty one."""
    _validate(spec, image)
    jname = spec.jname
    with ctx.lock(jname, "bcreate"):
        if ctx.inventory.get(jname) is not None:
            raise StateError(f"VM already exist: {jname}")
        wd = ctx.workdir
        _remove_files(ctx, jname)  # of a bcreate killed half-way (never in the inventory)
        try:
            wd.ensure_vm(jname)
            disk = wd.disk(jname, FIRST_DISK)
            if image:
                img.convert(Path(image), disk)
                if imgsize and imgsize > int(img.info(disk)["virtual-size"]):
                    img.resize(disk, imgsize)
            else:
                img.create(disk, imgsize or DEFAULT_IMGSIZE)
            spec = dataclasses.replace(
                spec, machine=resolve_machine(ctx.host, "pc"), disks=[FIRST_DISK],
                iso=_abs(spec.iso), kernel=_abs(spec.kernel), initrd=_abs(spec.initrd))
            ctx.inventory.add(spec)
        except BaseException:
            _remove_files(ctx, jname)
            raise
    return spec


def _remove_files(ctx: Context, jname: str) -> None:
    """A VM's runtime/metadata directory (checkpoints included) and its disks."""
    remove_tree(ctx.workdir.system(jname))
    remove_tree(ctx.workdir.vm_dir(jname))


def _abs(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def start(ctx: Context, jname: str, *, checkpoint: str | None = None,
          paused: bool = False) -> str:
    """Start, resume from hibernation, or restore a checkpoint. Returns what was done."""
    with ctx.locked_vm(jname, "bstart") as vm:
        status = vm.status(mine=True)
        if checkpoint is not None:
            check_name(checkpoint, "checkpoint name")
            require(jname, status, Action.RESTORE)
            from cbsd.core import savestate

            savestate.load(vm, ctx.workdir.checkpoint(jname, checkpoint), paused=paused)
            done = f"restored from checkpoint {checkpoint}"
        else:
            require(jname, status, Action.START)
            if status is Status.SUSPENDED:
                from cbsd.core.hibernate import resume

                resume(vm, paused=paused)
                done = "resumed from hibernation"
            else:
                mon = vm.launch(paused=paused)
                state = mon.status()
                ok = state in ("paused", "prelaunch") if paused else state == "running"
                if not ok:
                    vm.kill()
                    raise QemuError(f"{jname}: QEMU started but reports '{state}'")
                done = "started"
    return f"{jname}: {done}" + (" (paused)" if paused else "")


def stop(ctx: Context, jname: str, *, noacpi: bool = False, hard_timeout: int = 30) -> str:
    with ctx.locked_vm(jname, "bstop") as vm:
        status = vm.status(mine=True)
        if status is Status.OFF:
            raise StateError(f"{jname}: not running")
        require(jname, status, Action.STOP)
        if noacpi:
            vm.power_off()
            return f"{jname}: powered off"
        mon = vm.monitor()
        if status is Status.PAUSED:
            # A frozen guest cannot see the power button: thaw it so it can shut down.
            mon.cmd("cont")
            print(f"{jname}: was paused: resumed it so it can act on the ACPI power button",
                  file=sys.stderr)
        mon.cmd("system_powerdown")
        if process.wait_gone(vm.pid, vm.paths.qmp_sock, hard_timeout):
            vm.forget_process()
            return f"{jname}: stopped (ACPI shutdown)"
        vm.power_off()
        return f"{jname}: did not shut down within {hard_timeout} s: powered off"


def remove(ctx: Context, jname: str) -> str:
    with ctx.lock(jname, "bremove"):
        vm = VM.load(ctx, jname)
        if vm.alive():
            vm.power_off()
        # Inventory first: a crash after this leaves only files, which bcreate clears.
        ctx.inventory.remove(jname)
        _remove_files(ctx, jname)
    return f"{jname}: removed"


def select(ctx: Context, names: list[str], *, running: bool = False,
           boot: bool = False) -> list[str]:
    """Narrow resolved names for host shutdown/boot: VMs running now, or VMs due at boot
    (hibernated, or Off with astart=1)."""
    out = []
    for jname in names:
        vm = VM.load(ctx, jname)
        status = vm.status()
        due_at_boot = status is Status.SUSPENDED or (status is Status.OFF and vm.spec.astart)
        if (running and status in (Status.ON, Status.PAUSED)) or (boot and due_at_boot):
            out.append(jname)
    return out


def pause(ctx: Context, jname: str, mode: str = "auto") -> str:
    with ctx.locked_vm(jname, "bpause") as vm:
        status = vm.status(mine=True)
        if mode == "auto":
            mode = "off" if status is Status.PAUSED else "on"
        require(jname, status, Action.PAUSE if mode == "on" else Action.RESUME)
        return switch(vm.monitor(), jname, mode)
