"""What every command works with: the workdir, the inventory, the host's QEMU, name resolution.

A command that only reads (bls, bcheckpoint mode=list|verify) opens the context with
``writable=False``: it creates nothing, changes no mode and writes nothing, so it works on a
read-only or full workdir, and on one that does not exist yet (no VMs)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

from cbsd.core.vm.lock import VMLock
from cbsd.errors import NoSuchVM
from cbsd.model import VMSpec
from cbsd.names import check_mask, is_mask, match_mask
from cbsd.storage.inventory import Inventory
from cbsd.storage.paths import Workdir, default_workdir

if TYPE_CHECKING:
    from cbsd.core.vm.machine import VM
    from cbsd.qemu.host import Host


class Context:
    def __init__(self, workdir: Workdir | None = None, *, writable: bool = True) -> None:
        self.workdir = workdir or Workdir(default_workdir())
        self.writable = writable
        # The cluster's ownership guard (core/cluster/owner.py), which the CLI installs when
        # this workdir is a cluster node: every VM lock is held inside it. None: SSH-only.
        self.guard: Callable[[str, str], AbstractContextManager[None]] | None = None
        if writable:
            self.workdir.ensure()

    @functools.cached_property
    def inventory(self) -> Inventory:
        return Inventory(self.workdir.inventory, readonly=not self.writable)

    @property
    def host(self) -> Host:
        # lazy: the host's probe (subprocess, QEMU's capabilities) only for who asks for it
        from cbsd.qemu.host import probe

        return probe(self.workdir.inventory.parent / "host-cache.json")

    def spec(self, jname: str) -> VMSpec:
        spec = self.inventory.get(jname)
        if spec is None:
            raise NoSuchVM(f"No such VM: {jname}")
        return spec

    def resolve(self, masks: list[str], *, may_be_empty: bool = False) -> list[str]:
        """Expand names and masks to VM names (each once, in the order given, masks sorted).
        A mask that matches nothing is an error, unless the caller narrows the result further
        anyway (*may_be_empty*: host boot/shutdown selections, where no VM is no error)."""
        names = self.inventory.names()
        found: list[str] = []
        for mask in masks:
            check_mask(mask)
            hits = match_mask(mask, names) if is_mask(mask) else [mask] if mask in names else []
            if not hits and not (may_be_empty and is_mask(mask)):
                raise NoSuchVM(f"No VM matches the mask: {mask}" if is_mask(mask)
                               else f"No such VM: {mask}")
            found += [h for h in hits if h not in found]
        return found

    def lock(self, jname: str, what: str, wait: float = 0.0, *, vm: bool = True) -> VMLock:
        """Lock VM *jname* for command *what* (vm=False: a host-wide lock by that name).
        On a cluster node the command runs inside the ownership guard, entered once the lock
        is held, so the etcd record and the local lock agree."""
        lock = VMLock(self.workdir.lock_file(jname), jname, what).acquire(wait)
        if vm and self.guard is not None:
            try:
                lock.hold_in(self.guard(jname, what))
            except BaseException:
                lock.release()
                raise
        return lock

    @contextmanager
    def locked_vm(self, jname: str, what: str, *, recover: bool = True) -> Iterator[VM]:
        """The VM under its lock, with whatever an interrupted command left cleared first
        (recover=False: the caller runs recovery itself, e.g. after ending a wedged QEMU)."""
        # The VM at run time and its recovery (QEMU's argv, images, QMP: ~20 ms of imports)
        # only for a command that locks a VM: a Context alone stays light.
        # lazy: recovery only for a locked VM
        from cbsd.core.vm import recovery

        # lazy: the VM's module only for a locked VM
        from cbsd.core.vm.machine import VM

        with self.lock(jname, what) as lock:
            vm = VM.load(self, jname)
            vm.died = lock.died
            try:
                if recover:
                    recovery.recover(vm, lock.died)
                yield vm
            finally:
                vm.close()
