"""bregister and bunregister: a VM's inventory entry made again from the files beside its
disks, or dropped while every file is kept (the VM lifecycle itself: core/manage/lifecycle.py).

Both only touch the inventory and vm.json: no QEMU is started or stopped (a QEMU that kept
running while its entry was lost is adopted by bregister)."""

from __future__ import annotations

import json

from cbsd import specs
from cbsd.core.vm.context import Context
from cbsd.core.vm.definition import save_spec_file
from cbsd.core.vm.machine import VM, adopt_lost_qemu
from cbsd.errors import EnvironmentFault, StateError
from cbsd.failpoints import failpoint
from cbsd.model import Action, VMSpec, require
from cbsd.names import check_name
from cbsd.storage import ckpstore


def register(ctx: Context, jname: str) -> str:
    """Bring back a VM whose inventory entry was lost or is damaged, from the files beside
    its disks."""
    check_name(jname)
    wd = ctx.workdir
    with ctx.lock(jname, "bregister"):
        try:
            entry, damaged = ctx.inventory.get(jname), False
        except EnvironmentFault:
            entry, damaged = None, True  # an entry holding no definition: vm.json replaces it
        if entry is not None:
            raise StateError(f"{jname}: already registered")
        if wd.unfinished(jname).exists():
            raise StateError(f"{jname}: its files are those of a bcreate or bremove that was "
                             "cut short: nothing to register ('cbsd bcreate' clears them)")
        spec = _spec_from_files(ctx, jname)
        missing = [d for d in spec.disks if not wd.disk(jname, d).is_file()]
        if missing:
            raise StateError(f"{jname}: cannot register: disk {', '.join(missing)} is missing "
                             f"from {wd.vm_dir(jname)}")
        if not wd.spec_file(jname).exists():
            save_spec_file(ctx, spec)
        if damaged:
            ctx.inventory.update_spec(spec)  # its runtime hints (pid, VNC port) kept
        else:
            ctx.inventory.add(spec)
        adopt_lost_qemu(VM.load(ctx, jname), scan=True)  # a QEMU that kept running
    return f"{jname}: registered" + (" (its damaged inventory entry replaced)" if damaged else "")


def unregister(ctx: Context, jname: str) -> str:
    """bunregister: forget the inventory entry of a VM that is Off or hibernated and keep
    every file, so that `bregister` brings it back as it was.

    Crash-safe by the order alone: vm.json is rewritten from the entry (durably) before the
    entry goes, and no mark is ever made, so at every instant the files are either a listed
    VM or a whole unlisted one -- which core/vm/definition.py never deletes and bcreate
    refuses to overwrite. A VM whose folder carries the unfinished mark (a bremove cut
    short) is refused: its entry is what keeps those files from being cleared."""
    with ctx.locked_vm(jname, "bunregister") as vm:
        require(jname, vm.status(mine=True), Action.UNREGISTER)
        if ctx.workdir.unfinished(jname).exists():
            raise StateError(f"{jname}: a bremove of it was cut short: 'cbsd bremove "
                             f"jname={jname}' finishes it")
        save_spec_file(ctx, vm.spec)
        failpoint("bunregister:saved")
        ctx.inventory.remove(jname)
    return f"{jname}: unregistered (its files are kept: 'cbsd bregister jname={jname}' " \
           "brings it back)"


def _spec_from_files(ctx: Context, jname: str) -> VMSpec:
    """vm.json; for a VM made before cbsd kept one, the definition its newest saved state
    recorded. Either is checked as a definition from outside (cbsd/specs.py): UsageError
    naming the key it refuses."""
    wd = ctx.workdir
    origin = f"{jname}: cannot register: {wd.spec_file(jname)}"
    try:
        spec = specs.from_untrusted(json.loads(wd.spec_file(jname).read_bytes()), origin)
    except FileNotFoundError:
        states = [m for _, m in ckpstore.list_states(wd.checkpoints(jname)) if m is not None]
        if ckpstore.has_manifest(wd.hibernation(jname)):
            states.append(ckpstore.read_manifest(wd.hibernation(jname)))
        if not states:
            raise StateError(f"{jname}: no VM files to register under {wd.system(jname)} "
                             "(no vm.json, no saved state)") from None
        newest = max(states, key=lambda m: m.created_ts)
        spec = specs.from_untrusted(newest.spec, f"{jname}: cannot register: the definition "
                                    "its newest saved state holds")
    except (OSError, ValueError) as e:
        raise StateError(f"{jname}: cannot register: {wd.spec_file(jname)} is unreadable "
                         f"({e})") from e
    if spec.jname != jname:
        raise StateError(f"{jname}: cannot register: {wd.spec_file(jname)} describes "
                         f"'{spec.jname}'")
    return spec


def unregistered(ctx: Context) -> list[str]:
    """VM folders with a definition and no inventory entry (what `bregister '*'` may take)."""
    root = ctx.workdir.root / "jails-system"
    known = set(ctx.inventory.names())
    try:
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    return [n for n in names if n not in known and not ctx.workdir.unfinished(n).exists()
            and (ctx.workdir.spec_file(n).exists() or ctx.workdir.checkpoints(n).is_dir())]
