"""Settling a bmove or bmigrate that was cut short (recovery's first step, under the VM's lock).

The intent file (jails-system/VM/moving) records where the VM was going and how far the move
got; only the node can say whether it finished there, so it is asked. The halves that do the
moves live in core/hosts/move.py and core/hosts/migrate.py; this is what recovery needs of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

from cbsd import node_answers
from cbsd.core.vm.definition import remove_held
from cbsd.core.vm.machine import VM
from cbsd.core.vm.site import Site
from cbsd.errors import CbsdError, StateError, UsageError
from cbsd.qemu import migration
from cbsd.qemu.qmp import Monitor
from cbsd.qemu.runstate import RunState
from cbsd.ssh import Node


def node_named(ctx: Site, name: str) -> Node:
    for n, host, port in ctx.inventory.nodes():
        if n == name:
            return Node(n, host, port)
    raise UsageError(f"no node {name} (see 'cbsd node mode=list')")


def committed_there(node: Node, ident: str) -> bool:
    """Ask the node to drop what it staged as *ident*: False once dropped; True if the
    commit had come first (it holds the staging folder's lock, so the answer is final)."""
    out = node.call(["bimport", "mode=abort", f"id={ident}"], timeout=120)
    return node.checked("bimport mode=abort", node_answers.aborted, out) is not None


def interrupted_to(ctx: Site, node_name: str) -> list[str]:
    """The VMs whose interrupted bmove or bmigrate names node *node_name*."""
    found = []
    for jname in ctx.inventory.names():
        try:
            record = json.loads(ctx.workdir.moving(jname).read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("node") == node_name:
            found.append(jname)
    return found


def settle(vm: VM) -> None:
    """Recovery of an interrupted bmove (the VM's lock is held): clear an intent from phase
    1; from phase 2 ask the node to drop what it staged, which it does unless the commit
    came first: then the move is finished here (StateError saying so)."""
    ctx, jname = vm.ctx, vm.jname
    intent = ctx.workdir.moving(jname)
    try:
        record = json.loads(intent.read_bytes())
        node_name, ident = str(record["node"]), record.get("id")
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError, OSError):
        intent.unlink(missing_ok=True)  # written atomically: damaged means never finished
        return
    if record.get("live"):
        settle_migrate(vm, node_name, [int(x) for x in record.get("ssh", [])])
        return
    if ident is None:
        intent.unlink()
        return
    # "not sent": the node cannot have registered the VM (a record without the key comes
    # from a cbsd that did not say: assume the commit went out).
    sent = record.get("commit") != "not sent"
    way_out = (f"if node {node_name} is gone for good, delete {intent} to keep {jname} "
               "here")
    try:
        node = node_named(ctx, node_name)
    except UsageError:
        if not sent:  # node gone, never committed: never moved
            intent.unlink()
            return
        raise StateError(f"{jname}: an interrupted bmove to node {node_name}, which is no "
                         f"longer known here, may have been committed there: add the node "
                         f"again so that it can be asked; {way_out}") from None
    try:
        moved_there = committed_there(node, str(ident))
    except CbsdError as e:
        if not sent:  # the node never got the commit; its staged copy expires there
            intent.unlink()
            return
        raise StateError(f"{jname}: an interrupted bmove to node {node_name} cannot be "
                         f"settled until the node answers ({e}); the VM is kept here "
                         f"meanwhile, unusable: retry any command; {way_out}") from None
    if not moved_there:
        intent.unlink()  # the node dropped what it had staged: the VM stays here
        return
    remove_held(ctx, vm)
    raise StateError(f"{jname}: it was moved to node {node_name} (an interrupted bmove was "
                     f"completed): use node={node_name}")


# bmigrate's mirror of a disk on the sending side: its NBD target node and its block job
# (one name for both).
MIRROR = "mig-"


def mirror_of(node_name: str) -> str:
    return f"{MIRROR}{node_name}"


def drop_mirror_nodes(mon: Monitor, vm: VM) -> None:
    """What a migration attempt added to QEMU (mirror targets, the switchover pause)."""
    with contextlib.suppress(CbsdError):
        deadline = time.monotonic() + 30
        while any(str(j["device"]).startswith(MIRROR) for j in mon.cmd("query-block-jobs")) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        present = {n.get("node-name") for n in mon.cmd("query-named-block-nodes")}
        for image in vm.images():
            if mirror_of(image.node) in present:
                mon.cmd("blockdev-del", **{"node-name": mirror_of(image.node)})
        migration.set_capabilities(mon, migration.capabilities(mon),
                                   {"pause-before-switchover": False})


def settle_migrate(vm: VM, node_name: str, ssh: list[int] | None = None) -> None:
    """Recovery after a bmigrate cut off after "go" (the VM's lock is held here): the node
    says whether it has the VM (asked under the VM's lock there). If it does, the copy here
    is ended and removed (StateError saying so); if not, the VM runs on here."""
    _end_ssh(ssh or [], vm.jname)
    intent = vm.ctx.workdir.moving(vm.jname)
    try:
        node = node_named(vm.ctx, node_name)
        answer = node.checked("bmigrate mode=status", node_answers.migrate_status, node.call(
            ["bmigrate", "mode=status", f"jname={vm.jname}"], timeout=120))
    except CbsdError as e:
        raise StateError(f"{vm.jname}: an interrupted bmigrate to node {node_name} cannot be "
                         f"settled until the node answers ({e}); the VM is held here "
                         f"meanwhile: retry any command; if node {node_name} is gone for "
                         f"good, delete {intent} to keep {vm.jname} here") from None
    if answer == "registered":
        if vm.alive():
            vm.kill()
        remove_held(vm.ctx, vm)
        raise StateError(f"{vm.jname}: it was migrated to node {node_name} (an interrupted "
                         f"bmigrate was completed): use node={node_name}")
    if vm.alive():
        mon = vm.monitor()
        drop_mirror_nodes(mon, vm)
        if RunState.parse(mon.status()) is RunState.POSTMIGRATE:
            mon.cmd("cont")
    intent.unlink(missing_ok=True)


def _end_ssh(pids: list[int], jname: str) -> None:
    """The ssh processes a killed bmigrate left (the control one ends the node's half)."""
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ssh\x00") and (f"jname={jname}".encode() in cmd or
                                           f"/{jname}/".encode() in cmd):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
