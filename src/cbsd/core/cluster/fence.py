"""Self-fencing (docs/cluster.md, "Fencing and failover"): a node that cannot renew its lease
stops its HA VMs before the lease can expire at etcd, so the standby -- which acts only once
the lease is gone, plus a margin -- never resumes a VM whose QEMU still runs here.

Why it holds: etcd renews a lease when a keepalive *reaches* it, which is after the keeper
sent it; the keeper dates a renewal by the moment it sent the request (last_ok), so the lease
expires at etcd no earlier than last_ok + ttl. The keeper kills at last_ok + ttl - margin,
whatever its calls to etcd are doing (they may hang for their timeout: the check runs in its
own thread). The decisions are pure functions of (ttl, last_ok, now), tested as tables.

The kill takes no VM lock (a command stuck on the VM must not delay it): SIGKILL to every QEMU
the inventory or its pid file names, then wait until all are gone. Nothing here restarts a
fenced VM: a start goes through the ownership guard, which refuses while etcd is out of
reach and, later, while the record names the standby."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from typing import Any

from cbsd.core.vm.machine import VM
from cbsd.core.vm.site import Site
from cbsd.errors import CbsdError
from cbsd.qemu import process

KILL_WAIT = 5.0  # seconds a SIGKILLed QEMU gets to be gone (it is, in milliseconds, unless
#                  stuck in the kernel: then fencing failed and the watchdog is the backstop)


def margin(ttl: float) -> float:
    """How long before the lease's earliest expiry the keeper kills: room for the kill itself
    and the keeper's tick, never more than a third of the lease (renewals come every ttl/3,
    so one late renewal never fences)."""
    return min(2.0, ttl / 3)


def fence_due(ttl: float, last_ok: float, now: float, margin_s: float) -> bool:
    """Whether this node must stop its HA VMs now: its last successful renewal (dated by when
    it was sent) is ttl - margin old or more, so the lease may expire at etcd within margin."""
    return now - last_ok >= ttl - margin_s


def pet_safe(ttl: float, last_ok: float, now: float, timeout: float, margin_s: float) -> bool:
    """Whether the keeper may pet a watchdog of *timeout* s now: a reboot one timeout from
    now (the keeper hanging right after this pet) still comes before fencing is due, so
    before the lease can expire. With a watchdog, fencing starts where this stops holding
    (a healthy keeper fences rather than have the host rebooted): fence_due at now + timeout.
    """
    return not fence_due(ttl, last_ok, now + timeout, margin_s)


def takeover_due(first_gone: float | None, now: float, margin_s: float) -> bool:
    """The standby's side: the owner's alive key was first seen gone at *first_gone* (None:
    it is there); take over once it has stayed gone for the margin (the owner fenced by the
    lease's earliest expiry; the margin covers a kill that took longer)."""
    return first_gone is not None and now - first_gone >= margin_s


def ha_owned(records: dict[str, dict[str, Any]], me: str) -> set[str]:
    """The VMs a standby may take from this node: records naming this node with an HA
    standby set. These are the ones fenced."""
    return {j for j, rec in records.items()
            if rec.get("node") == me and isinstance(rec.get("ha"), dict)}


def local_ha(site: Site, *, unreadable: bool = True) -> set[str]:
    """The VMs whose definition here says ha=1 -- what a keeper fences before its first read
    of the cluster (the records are out of reach: etcd may be why it is due). An HA VM's
    record gets its "ha" from this definition (the guard's facts), so the set holds every VM
    a standby may take from this node; a definition that cannot be parsed counts too (it
    may be an HA one) unless *unreadable* is False."""
    return {j for j, spec, _, _ in site.inventory.all()
            if (unreadable if isinstance(spec, Exception) else spec.ha and spec.ha_node)}


def stale_here(records: dict[str, dict[str, Any]], me: str, local: Iterable[str],
               moving: Iterable[str], local_ha: Iterable[str] = ()) -> set[str]:
    """VMs in this node's inventory that are provably the VM another node owns now --
    taken over while this node was cut off, or while its keeper was down: the record says
    it was taken from this node, or it is an HA record and the copy here is defined ha=1
    (*local_ha*; ha=1 is set only by the owner, so this copy was the VM) -- and that no move
    of this node's hands over (a bmigrate's record names the target, "from" this node, while
    the guest still runs here; its intent file says so too): their QEMU must not run here.
    A same-name VM that was here before the node joined, and never owned, is not one of them
    (docs/cluster.md: it stays unowned here, every change refused, but it is not killed)."""
    busy, ha_here = set(moving), set(local_ha)
    return {j for j in local
            if j in records and records[j].get("node") not in (None, me)
            and (records[j].get("taken_from") == me
                 or (isinstance(records[j].get("ha"), dict) and j in ha_here))
            and records[j].get("from") != me and j not in busy}


def _signal(site: Site, jname: str) -> tuple[int, str] | None:
    """SIGKILL VM *jname*'s QEMU here if it runs: its (pid, marker), None if nothing of it
    ran. No lock taken, no wait."""
    try:
        vm = VM.load(site, jname)
    except CbsdError:
        return None  # not in this inventory: nothing of it runs here
    if not vm.alive():
        return None
    marker = vm.paths.qmp_sock
    process.kill(vm.pid, marker, signal.SIGKILL)
    return vm.pid, marker


def kill(site: Site, jname: str) -> bool | None:
    """SIGKILL VM *jname*'s QEMU here if it runs: None if nothing of it ran, else whether it
    is gone now."""
    killed, left = kill_all(site, [jname])
    return True if killed else False if left else None


def kill_all(site: Site, jnames: Iterable[str]) -> tuple[list[str], list[str]]:
    """Kill every one of *jnames* that runs here: (the ones killed, the ones still running
    after it). Every QEMU gets its SIGKILL first, then the waits share one deadline: a QEMU
    stuck in the kernel must not hold up the kill of the others past the margin."""
    sent = {j: h for j in sorted(jnames) if (h := _signal(site, j)) is not None}
    deadline = time.monotonic() + KILL_WAIT
    gone = {j: process.wait_gone(pid, marker, max(0.0, deadline - time.monotonic()))
            for j, (pid, marker) in sent.items()}
    return [j for j, g in gone.items() if g], [j for j, g in gone.items() if not g]
