"""bcreate, bstart, bstop, bremove, bregister, bpause: the VM lifecycle and its transitions.

What cbsd deletes, and the marks that make bcreate and bremove crash-safe: core/vm/definition.py.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cbsd import clock, specs
from cbsd.core.checkpoint import tree
from cbsd.core.manage import cron
from cbsd.core.manage.nics import with_macs
from cbsd.core.vm import guest_agent, ramfile, recovery
from cbsd.core.vm.context import Context
from cbsd.core.vm.definition import (
    clear_unfinished,
    mark_unfinished,
    remove_held,
    save_spec_file,
    unmark,
)
from cbsd.core.vm.machine import EFI_VARS, VM, adopt_lost_qemu
from cbsd.core.vm.pause import switch
from cbsd.errors import EnvironmentFault, QemuError, StateError, UsageError
from cbsd.failpoints import failpoint
from cbsd.model import CLOUD_INIT_KEYS, SCHEDULE_KEYS, Action, Status, VMSpec, require
from cbsd.names import check_name
from cbsd.qemu import img, process
from cbsd.qemu.host import resolve_machine
from cbsd.qemu.runstate import RunState
from cbsd.storage import ckpstore

FIRST_DISK = "dsk1.qcow2"
BOOT_AGENT_WAIT = 300.0  # seconds the helper waits for the agent of a booting guest
DEFAULT_IMGSIZE = 10 << 30


def host_memory() -> int:
    """MemTotal of this host in bytes (0 if /proc does not say)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def validate(spec: VMSpec, image: str | None = None) -> None:
    """What a definition must satisfy (bcreate and bset): UsageError naming the key."""
    check_name(spec.jname)
    specs.check_relations(spec)
    total = host_memory()
    if total and spec.ram > total:
        raise UsageError(f"vm_ram={spec.ram >> 20}m is more than this host's memory "
                         f"({total >> 20} MiB): QEMU could not start it")
    for key, value in (("image", image), ("iso", spec.iso), ("kernel", spec.kernel),
                       ("initrd", spec.initrd)):
        if value is not None and not Path(value).is_file():
            raise UsageError(f"{key}: no such file: {value}")
    # Last, the check every definition read back later meets (inventory, vm.json, archives):
    # what bcreate or bset stores can never become a "damaged" entry.
    specs.from_untrusted(spec.to_dict(), spec.jname)
    cron.check_schedule(spec.checkpoint_schedule, clock.now())  # beyond its shape: croniter


def check_host(ctx: Context, spec: VMSpec) -> None:
    """What the spec asks of this host's QEMU, probed (not assumed)."""
    host = ctx.host
    if spec.virtio_rnd and "virtio-rng-pci" not in host.devices:
        raise UsageError(f"virtio_rnd=1 needs QEMU's virtio-rng-pci, which QEMU "
                         f"{host.version} lacks (use virtio_rnd=0)")
    if spec.efi == "uefi" and not host.ovmf:
        raise UsageError("vm_efi=uefi needs UEFI firmware (OVMF): apt-get install ovmf")


def create(ctx: Context, spec: VMSpec, *, imgsize: int | None = None,
           image: str | None = None) -> VMSpec:
    """Define a VM from *spec* (its disks and machine type are filled in here): its first disk
    is *image* converted to qcow2 (grown to *imgsize* if larger), or a new empty one."""
    spec = dataclasses.replace(spec, iso=_abs(spec.iso), kernel=_abs(spec.kernel),
                               initrd=_abs(spec.initrd))
    validate(spec, image)
    check_host(ctx, spec)
    spec = dataclasses.replace(spec, machine=resolve_machine(ctx.host, "pc"),
                               disks=[FIRST_DISK], nics=with_macs(ctx, spec.nics))
    wd = ctx.workdir
    jname = spec.jname

    def make(_: Path) -> None:
        disk = wd.disk(jname, FIRST_DISK)
        if image:
            # The user's own file: convert reads it whole (through any backing chain or data
            # file, as the user could) and writes a qcow2 naming no other file, checked here.
            img.convert(Path(image), disk)
            img.check(disk, f"image={image}: its qcow2 copy")
            if imgsize and imgsize > int(img.info(disk)["virtual-size"]):
                img.resize(disk, imgsize)
        else:
            img.create(disk, imgsize or DEFAULT_IMGSIZE)
        if spec.efi == "uefi":
            # The VM's own variable store, a qcow2 copy of the template: internal snapshots
            # (checkpoints) need every writable image to be qcow2.
            img.convert(Path(ctx.host.ovmf[0][1]), wd.disk(jname, EFI_VARS), source="raw")
        if spec.cloud_init:
            # lazy: only bcreate; bstart, bstop and bpause import lifecycle without it
            from cbsd.core.manage import cloudinit

            cloudinit.write_seed(wd.seed(jname), cloudinit.documents(jname, spec.cloud_init))
        if spec.checkpoint_schedule:  # the schedule starts now: its first slot is the next
            cron.record_run(wd, jname, clock.now())
        failpoint("bcreate:disk")

    return create_from(ctx, spec, make)


def create_from_keys(ctx: Context, a: dict[str, Any]) -> VMSpec:
    """bcreate's keys (as its key table parses them: every key present, defaults filled in)
    -> a new VM. The CLI's bcreate and the service's POST /1.0/instances both call this."""
    # lazy: only bcreate builds a cloud-init seed (pycdlib behind it)
    from cbsd.core.manage.cloudinit import settings

    # NIC 1 from the single-NIC keys (create gives it its MAC); more: bhyve-nic.
    nics = specs.with_first_nic([], fresh_mac="", nic=a["nic"], mac=a["nic_hwaddr"] or "",
                                interface=a["interface"] or "", hostfwd=a["hostfwd"])
    return create(ctx, VMSpec(
        jname=a["jname"], ram=a["vm_ram"], cpus=a["vm_cpus"], os_type=a["vm_os_type"],
        iso=a["iso"], kernel=a["kernel"], initrd=a["initrd"], cmdline=a["cmdline"],
        vnc=a["vnc"], vnc_password=a["vnc_password"], nics=nics,
        astart=a["astart"], guest_agent=ctx.host.agent_channel, virtio_rnd=a["virtio_rnd"],
        efi=a["vm_efi"], ram_file=a["vm_ramfile"], dedup=a["vm_dedup"], genid=a["vm_genid"],
        cloud_init=settings({k: a[k] for k in CLOUD_INIT_KEYS}),
        **{k: a[k] for k in SCHEDULE_KEYS}), imgsize=a["imgsize"], image=a["image"])


def create_from(ctx: Context, spec: VMSpec, make: Callable[[Path], None]) -> VMSpec:
    """Register a new VM whose files *make* writes into its folder (bcreate, bclone), under
    the protocol that lets cbsd delete only what it made: the folder is marked unfinished
    first, the definition written, the mark removed, and only then the inventory entry made."""
    jname = spec.jname
    wd = ctx.workdir
    with ctx.lock(jname, "bcreate"):
        if ctx.inventory.get(jname) is not None:
            raise StateError(f"VM already exist: {jname}")
        clear_unfinished(ctx, jname)
        found = [p for p in (wd.system(jname), wd.vm_dir(jname)) if p.exists()]
        if found:
            raise StateError(
                f"bcreate: {jname} is not in the inventory, but files of a VM by that name "
                f"exist ({', '.join(map(str, found))}): if it is a VM whose inventory entry "
                f"was lost, 'cbsd bregister jname={jname}' brings it back; otherwise move "
                "them away first (cbsd deletes nothing it did not make)")
        try:
            wd.system(jname).mkdir(mode=0o700)
            mark_unfinished(ctx, jname)
            wd.ensure_vm(jname)
            make(wd.vm_dir(jname))
            save_spec_file(ctx, spec)
            # The mark goes before the entry comes: a crash between the two leaves a whole VM
            # that only needs `bregister`, never an entry beside files marked for deletion.
            unmark(ctx, jname)
            ctx.inventory.add(spec)
        except BaseException:
            clear_unfinished(ctx, jname)
            raise
    return spec


def _abs(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def start(ctx: Context, jname: str, *, checkpoint: str | None = None,
          paused: bool = False) -> str:
    """Start, resume from hibernation, or restore a checkpoint. Returns what was done."""
    with ctx.locked_vm(jname, "bstart") as vm:
        return start_held(vm, checkpoint=checkpoint, paused=paused)


def start_held(vm: VM, *, checkpoint: str | None = None, paused: bool = False) -> str:
    """start() on a VM whose lock the caller holds (bstart, brestart, a scheduled checkpoint
    of a stopped VM)."""
    ctx, jname = vm.ctx, vm.jname
    status = vm.status(mine=True)
    if checkpoint is not None:
        check_name(checkpoint, "checkpoint name")
        require(jname, status, Action.RESTORE)
        # lazy: only a restore: a plain bstart skips the checkpoint engine
        from cbsd.core.checkpoint import load

        load.load(vm, ctx.workdir.checkpoint(jname, checkpoint), paused=paused)
        tree.set_current(ctx.workdir, jname, checkpoint)
        done = f"restored from checkpoint {checkpoint}"
    else:
        require(jname, status, Action.START)
        if status is Status.SUSPENDED:
            # lazy: only a resume from hibernation (see load above)
            from cbsd.core.checkpoint.hibernate import resume

            # A VM hibernated while paused comes back paused, as it was.
            paused = resume(vm, paused=True if paused else None)
            done = "resumed from hibernation"
        else:
            tree.set_current(ctx.workdir, jname, None)  # a cold boot descends from nothing
            mon = vm.launch(paused=paused, ram_file=ramfile.fresh(vm))
            state = mon.status()
            ok = (state in (RunState.PAUSED, RunState.PRELAUNCH) if paused
                  else state == RunState.RUNNING)
            if not ok:
                vm.kill()
                raise QemuError(f"{jname}: QEMU started but reports '{state}'")
            if vm.spec.guest_agent:
                guest_agent.tend(vm, settime=False, seconds=BOOT_AGENT_WAIT)
            done = "started"
    return f"{jname}: {done}" + (" (paused)" if paused else "")


def stop(ctx: Context, jname: str, *, noacpi: bool = False, hard_timeout: int = 30) -> str:
    if noacpi:
        return _power_off(ctx, jname)
    with ctx.locked_vm(jname, "bstop") as vm:
        status = vm.status(mine=True)
        if status is Status.OFF:
            raise StateError(f"{jname}: not running")
        require(jname, status, Action.STOP)
        return _acpi_stop_held(vm, status, hard_timeout)


def _acpi_stop_held(vm: VM, status: Status, hard_timeout: int) -> str:
    """The ACPI power button, then power-off after *hard_timeout* s (lock held, VM running)."""
    jname = vm.jname
    mon = vm.monitor()
    if status is Status.PAUSED:
        # A frozen guest cannot see the power button: thaw it so it can shut down.
        mon.cmd("cont")
        print(f"{jname}: was paused: resumed it so it can act on the ACPI power button",
              file=sys.stderr)
    mon.cmd("system_powerdown")
    if process.wait_gone(vm.pid, vm.paths.qmp_sock, hard_timeout, cancellable=True):
        vm.forget_process()
        return f"{jname}: stopped (ACPI shutdown)"
    vm.power_off()
    return f"{jname}: did not shut down within {hard_timeout} s: powered off"


def _power_off(ctx: Context, jname: str) -> str:
    """bstop noacpi=1, the escape hatch: QEMU ends whatever its monitor does (a wedged or
    stopped QEMU never answers). Recovery runs after, on a VM with no QEMU: ending QEMU first
    is safe in every state recovery knows (core/vm/recovery.py: a published hibernation image
    is never older than the guest, so it stays valid)."""
    with ctx.locked_vm(jname, "bstop", recover=False) as vm:
        _power_off_held(vm, Action.STOP)
    return f"{jname}: powered off"


def _power_off_held(vm: VM, action: Action) -> None:
    """_power_off() on a VM locked without recovery; refused as *action* if not running."""
    ctx, jname = vm.ctx, vm.jname
    adopt_lost_qemu(vm, scan=bool(vm.died))
    if not vm.alive():
        recovery.recover(vm, vm.died)
        status = vm.status(mine=True)
        require(jname, status, action)
        raise StateError(f"{jname}: not running")
    if ckpstore.has_manifest(ctx.workdir.hibernation(jname)) and \
            vm.probe_state() is RunState.RUNNING:
        recovery.recover(vm, vm.died)  # a stale image an older cbsd left: dropped first
    vm.power_off()
    recovery.recover(vm, vm.died)


def restart(ctx: Context, jname: str, *, noacpi: bool = False, hard_timeout: int = 30) -> str:
    """brestart: bstop then bstart of a running (or paused) VM under one lock, so no other
    command can act on it in between; the guest boots afresh (not paused). A VM that is Off
    or hibernated is refused (model.ALLOWED[Action.RESTART]): nothing is stopped or started.
    noacpi=1 locks without recovery first, as bstop noacpi=1 does: a wedged QEMU is what a
    restart is for."""
    with ctx.locked_vm(jname, "brestart", recover=not noacpi) as vm:
        if noacpi:
            _power_off_held(vm, Action.RESTART)
            stopped = f"{jname}: powered off"
        else:
            status = vm.status(mine=True)
            require(jname, status, Action.RESTART)
            stopped = _acpi_stop_held(vm, status, hard_timeout)
        failpoint("brestart:stopped")
        started = start_held(vm)
    return f"{stopped}\n{started}"


def remove(ctx: Context, jname: str) -> str:
    with ctx.lock(jname, "bremove"):
        remove_held(ctx, VM.load(ctx, jname))
    return f"{jname}: removed"


def select(ctx: Context, names: list[str], *, running: bool = False,
           boot: bool = False) -> list[str]:
    """Narrow resolved names for host shutdown/boot: VMs running now, or VMs due at boot
    (hibernated, or Off with astart=1)."""
    out = []
    for jname in names:
        try:
            vm = VM.load(ctx, jname)
        except EnvironmentFault:
            # A damaged entry: kept, so the command names it (cli/commands.each, one line)
            # while it goes on with the others -- host shutdown must not stop at one VM.
            out.append(jname)
            continue
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
        return switch(vm.monitor(), jname, mode, str(ctx.workdir.system(jname)))
