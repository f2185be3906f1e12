"""bhyve-nic: a stopped VM's NICs -- list, attach, detach -- and the MAC addresses cbsd gives
NICs (bcreate, bclone, bset, attach).

A VM's NICs are its definition's `nics`, in PCI order (the guest's eth0, eth1, ...), each with
CBSD's bhyvenic keys: nic_type (user: QEMU's NAT; bridge: a tap), nic_parent (the bridge;
empty: cbsd's own network cbsd0, which CBSD spells nic_parent=auto), nic_hwaddr, and hostfwd
for a user NIC. NIC 1 is also what bcreate's and bset's nic=, interface=, nic_hwaddr= and
hostfwd= set.

A saved state holds the NICs it was saved with (each is a PCI device of the stream, and a user
NIC has QEMU state of its own), so a checkpoint restores only while the VM's NIC types are,
in order, those it was taken with (VMSpec.restore_relevant "nic"; load.incompatibility says
which differ). attach/detach say which checkpoints that makes unrestorable; undoing the
change makes them restorable again. The VM must be Off: a running or hibernated one holds
its devices.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from typing import Any

from cbsd import specs
from cbsd.core.vm.context import Context
from cbsd.core.vm.definition import save_spec_file
from cbsd.errors import UsageError
from cbsd.model import Action, Nic, VMSpec, require
from cbsd.qemu.argv import nic_model
from cbsd.qemu.network import MANAGED

# nic_parent= values that mean cbsd's own network (CBSD's default upstream is "auto").
MANAGED_PARENTS = ("", "auto", MANAGED)


def new_mac(taken: Collection[str] = ()) -> str:
    """A random address in QEMU's locally administered range 52:54:00:xx:xx:xx, none of
    *taken* (taken_macs: every NIC's of this workdir)."""
    while True:
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))
        if mac not in taken:
            return mac


def taken_macs(ctx: Context) -> set[str]:
    """The MAC of every NIC of every VM this inventory holds (a damaged entry has none)."""
    return {n.nic_hwaddr for _, spec, _, _ in ctx.inventory.all()
            if isinstance(spec, VMSpec) for n in spec.nics if n.nic_hwaddr}


def with_macs(ctx: Context, nics: list[Nic], *, renew: bool = False) -> list[Nic]:
    """*nics*, each NIC without a MAC given a new one; *renew* (a clone): each NIC with a
    MAC gets a new one instead (one without keeps QEMU's default, as its original)."""
    taken = taken_macs(ctx)
    out = []
    for nic in nics:
        if (renew and nic.nic_hwaddr) or (not renew and not nic.nic_hwaddr):
            nic = dataclasses.replace(nic, nic_hwaddr=new_mac(taken))
        taken.add(nic.nic_hwaddr)
        out.append(nic)
    return out


def parent_shown(nic: Nic) -> str:
    return "" if nic.nic_type == "user" else nic.nic_parent or MANAGED


def listing(ctx: Context, jname: str) -> list[dict[str, Any]]:
    """Each NIC as bhyve-nic mode=list shows it; ip4_addr: what cbsd0's DHCP server leased
    it ("" for other networks: cbsd cannot know)."""
    # lazy: only the listing asks leases; the rest of bhyve-nic needs no VM
    from cbsd.core.vm.guest_agent import lease_addresses

    spec = ctx.spec(jname)
    leases = lease_addresses(ctx.workdir, spec)
    return [{"nic_id": i + 1, "nic_type": n.nic_type, "nic_parent": parent_shown(n),
             "nic_hwaddr": n.nic_hwaddr, "nic_driver": nic_model(spec),
             "hostfwd": list(n.hostfwd), "ip4_addr": leases[i] or ""}
            for i, n in enumerate(spec.nics)]


def attach(ctx: Context, jname: str, nic_type: str, nic_parent: str | None,
           nic_hwaddr: str | None, hostfwd: list[str]) -> str:
    if nic_type == "user" and nic_parent is not None:
        raise UsageError("bhyve-nic: nic_parent= needs nic_type=bridge (a user NIC is QEMU's "
                         "NAT, on no bridge)")
    if nic_type == "bridge" and hostfwd:
        raise UsageError("bhyve-nic: hostfwd= needs nic_type=user")
    parent = "" if nic_parent in (None, *MANAGED_PARENTS) else str(nic_parent)
    with ctx.locked_vm(jname, "bhyve-nic attach") as vm:
        require(jname, vm.status(mine=True), Action.NICS)
        old = vm.spec
        if nic_hwaddr is not None:
            owner = _owner(ctx, nic_hwaddr)
            if owner:
                raise UsageError(f"bhyve-nic: nic_hwaddr={nic_hwaddr} is the MAC of {owner} "
                                 "(each NIC needs its own)")
        nic = Nic(nic_type=nic_type, nic_hwaddr=nic_hwaddr or "", nic_parent=parent,
                  hostfwd=list(hostfwd))
        new = dataclasses.replace(old, nics=[*old.nics, *with_macs(ctx, [nic])])
        _record(ctx, new)
    added = new.nics[-1]
    where = (f"on {parent_shown(added)}" if added.nic_type == "bridge" else "user-mode NAT")
    return (f"{jname}: NIC {len(new.nics)} attached ({where}, nic_hwaddr={added.nic_hwaddr})"
            + _stale_note(ctx, jname, old, new))


def detach(ctx: Context, jname: str, nic_id: int | None, nic_hwaddr: str | None) -> str:
    if (nic_id is None) == (nic_hwaddr is None):
        raise UsageError("bhyve-nic: mode=detach needs nic_id= or nic_hwaddr= (one of them; "
                         "see mode=list)")
    with ctx.locked_vm(jname, "bhyve-nic detach") as vm:
        require(jname, vm.status(mine=True), Action.NICS)
        old = vm.spec
        ids = [i + 1 for i, n in enumerate(old.nics)
               if i + 1 == nic_id or (nic_hwaddr is not None and n.nic_hwaddr == nic_hwaddr)]
        if not ids:
            what = f"nic_id={nic_id}" if nic_id is not None else f"nic_hwaddr={nic_hwaddr}"
            raise UsageError(f"bhyve-nic: {jname} has no NIC {what} (it has "
                             f"{len(old.nics)}: see 'cbsd bhyve-nic mode=list jname={jname}')")
        gone = old.nics[ids[0] - 1]
        new = dataclasses.replace(old, nics=[n for i, n in enumerate(old.nics)
                                             if i + 1 != ids[0]])
        _record(ctx, new)
    return (f"{jname}: NIC {ids[0]} detached (nic_hwaddr={gone.nic_hwaddr or '-'}); "
            f"{len(new.nics)} left" + _stale_note(ctx, jname, old, new))


def _owner(ctx: Context, mac: str) -> str | None:
    """Which VM's NIC has *mac* already ("VM's NIC N"), or None."""
    for jname, spec, _, _ in ctx.inventory.all():
        if isinstance(spec, VMSpec):
            for i, n in enumerate(spec.nics):
                if n.nic_hwaddr == mac:
                    return f"{jname}'s NIC {i + 1}"
    return None


def _record(ctx: Context, new: VMSpec) -> None:
    """The new NIC list, checked as every definition is, into the inventory then vm.json."""
    specs.from_untrusted(new.to_dict(), "bhyve-nic")
    ctx.inventory.update_spec(new)
    save_spec_file(ctx, new)


def _stale_note(ctx: Context, jname: str, old: VMSpec, new: VMSpec) -> str:
    # lazy: bcreate and bclone import this module for MACs, not the checkpoint engine
    from cbsd.core.checkpoint.checkpoints import unrestorable_after

    stale = unrestorable_after(ctx, jname, old, new)
    if not stale:
        return ""
    return (f" (checkpoint(s) {', '.join(stale)} hold the old NICs and cannot be restored "
            "with these: 'cbsd bcheckpoint mode=list' shows why; undoing the change makes "
            "them restorable again)")
