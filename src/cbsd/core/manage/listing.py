"""bls: one row per VM, with the contract's columns."""

from __future__ import annotations

from typing import Any

from cbsd.core.vm import guest_agent
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.model import BLS_COLUMNS as COLUMNS
from cbsd.model import Status, VMSpec

__all__ = ["COLUMNS", "row", "rows"]


def rows(ctx: Context, names: list[str] | None
         ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(one row per VM, notes on what could not be learned: a QEMU that does not answer its
    monitor is listed as On after a short wait, and noted; the VMs whose entry is damaged,
    each named in one line). A damaged entry is not listed -- nothing it says can be
    believed, not even its status -- and never stops the others from being listed: bls
    prints them, the damaged ones on stderr, and exits 1 (as `ls` does with a file it
    cannot read)."""
    out = []
    notes = []
    damaged = []
    wanted = set(names) if names is not None else None
    for jname, text, pid, port in ctx.inventory.entries():
        if wanted is not None and jname not in wanted:
            continue  # not parsed: `bls vm1` of a host with 1,000 VMs reads one definition
        spec = ctx.inventory.parse(jname, text)
        if not isinstance(spec, VMSpec):
            damaged.append(str(spec))
            continue
        line, note = row(ctx, spec, pid, port)
        out.append(line)
        if note:
            notes.append(note)
    return out, notes, damaged


def row(ctx: Context, spec: VMSpec, pid: int, port: int) -> tuple[dict[str, Any], str]:
    """One VM's row, derived now from its inventory entry (*spec*, *pid*, *port*) and
    reality, and a note if its QEMU did not answer ("" otherwise). The service's list
    (service/rowcache.py) calls it for each VM whose row may have changed."""
    vm = VM(ctx, spec, (pid, port))
    status = vm.status()
    note = ""
    if vm.unresponsive:
        note = (f"{spec.jname}: QEMU (pid {vm.pid}) does not answer its monitor; "
                f"'cbsd bstop jname={spec.jname} noacpi=1' powers it off")
    live = status in (Status.ON, Status.PAUSED) or (status is Status.MAINTENANCE and vm.alive())
    curmem, pcpu = vm.rss_and_cpu() if live else (0, 0.0)
    return {
        "jname": spec.jname,
        "jid": vm.pid if live else 0,
        "vm_ram": spec.ram >> 20,
        "vm_curmem": curmem,
        "vm_cpus": spec.cpus,
        "pcpu": pcpu,
        "vm_os_type": spec.os_type,
        "ip4_addr": (live and guest_agent.ip4(vm)) or ("DHCP" if spec.nic != "none" else "-"),
        "status": status.value,
        "vnc_port": f"{spec.vnc_bind}:{vm.vnc_port}" if live and vm.vnc_port else "0",
    }, note
