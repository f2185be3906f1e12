"""bmove: a stopped or hibernated VM, with its checkpoints, to another node (a running one is
hibernated first and resumed there).

Two phases, so the VM is registered on exactly one host at every instant:
  1. send: the VM's archive goes through `ssh NODE cbsd bimport in=- mode=stage`, which
     verifies all of it into a staging folder there and answers its id; nothing is
     registered on the node.
  2. commit: the intent file here records the id, then `bimport mode=commit id=ID` registers
     the VM there (idempotent), and the VM is removed here.
While jails-system/VM/moving exists the VM is held here: a bmove killed in phase 1 leaves it
intact here (the node drops an archive cut short at once, an unclaimed staged one after a
day); one killed in phase 2 is settled by the next command on the VM, which asks the node to drop
the staged VM (bimport mode=abort): done unless the commit had arrived, in which case the VM
is the node's only and is removed here. The intent says whether the commit may have gone out:
until it did, a node that cannot be asked (or was removed) cannot have the VM, and the move
is settled as never made. A commit whose ssh ends without its answer is settled the same way
at once: the node's own word (abort: 'aborted' or 'committed') decides, not the exit code.
Every answer of the node is checked for its shape first (cbsd/node_answers.py).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from typing import IO, cast

from cbsd import node_answers
from cbsd.core.checkpoint import hibernate
from cbsd.core.cluster import admin
from cbsd.core.hosts import transfer
from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.core.vm.definition import remove_held
from cbsd.core.vm.machine import VM
from cbsd.core.vm.moving import committed_there, node_named
from cbsd.errors import CbsdError, NodeError, StateError
from cbsd.failpoints import failpoint
from cbsd.model import Status
from cbsd.ssh import Node
from cbsd.storage.atomic import write_atomic


def move(ctx: Context, jname: str, node_name: str) -> str:
    node = node_named(ctx, node_name)
    started = time.monotonic()
    status = transfer.status_of(ctx, jname)
    was_running = status in (Status.ON, Status.PAUSED)
    if was_running:
        hibernate.suspend(ctx, jname)
    try:
        with ctx.locked_vm(jname, "bmove") as vm:
            _send_and_commit(vm, node)
    except BaseException:
        if was_running:  # put it back as it was, if it is still here
            _resume_here(ctx, jname)
        raise
    if not was_running:
        return f"{jname}: moved to node {node.name}"
    node.call(["bstart", f"jname={jname}"])
    downtime = time.monotonic() - started
    return f"{jname}: moved to node {node.name}, running there (downtime {downtime:.1f} s)"


def _resume_here(ctx: Context, jname: str) -> None:
    with contextlib.suppress(CbsdError):
        if ctx.inventory.get(jname) is not None and \
                transfer.status_of(ctx, jname) is Status.SUSPENDED:
            lifecycle.start(ctx, jname)


def _send_and_commit(vm: VM, node: Node) -> None:
    ctx, jname = vm.ctx, vm.jname
    intent = ctx.workdir.moving(jname)
    _intend(vm, node.name, None)
    try:
        ident = _send(vm, node)
    except BaseException:
        intent.unlink(missing_ok=True)
        raise
    _intend(vm, node.name, ident, commit="not sent")
    failpoint("bmove:staged")  # from here recovery asks the node (settle)
    # On a cluster node, the switchover: the owner record goes to the node in one
    # compare-and-swap before the commit can reach it (its commit checks it owns the VM).
    take_back = admin.hand_over(ctx.workdir, jname, node.name)
    failpoint("bmove:switched")
    _intend(vm, node.name, ident, commit="sent")
    failpoint("bmove:committing")
    try:
        node.checked("bimport mode=commit", node_answers.committed,
                     node.call(["bimport", "mode=commit", f"id={ident}"]))
    except NodeError as failed:
        # The ssh, or cbsd there, ended without saying it was done: perhaps after it
        # registered the VM. What the node holds decides, not how the command ended.
        try:
            there = committed_there(node, ident)
        except CbsdError as e:
            raise StateError(f"{jname}: the commit on node {node.name} ended without its "
                             f"answer ({failed}) and the node cannot be asked now whether it "
                             f"has the VM ({e}): the next command on {jname} settles "
                             "it") from None
        if not there:
            intent.unlink()  # it dropped what it staged: the VM stays here, as it was
            take_back()
            raise
    failpoint("bmove:committed")
    remove_held(ctx, vm)


def _intend(vm: VM, node_name: str, ident: str | None, commit: str | None = None) -> None:
    """The intent file: where the VM is going, the staging id there once the node has it,
    and whether the commit may have gone out ("not sent": the node cannot have the VM)."""
    record: dict[str, str | None] = {"node": node_name, "id": ident}
    if commit is not None:
        record["commit"] = commit
    write_atomic(vm.ctx.workdir.moving(vm.jname), json.dumps(record).encode())


def _send(vm: VM, node: Node) -> str:
    """Phase 1: the archive through ssh into a staging folder on the node; its id."""
    proc = subprocess.Popen(node.argv(["bimport", "in=-", "mode=stage"]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        try:
            transfer.write_archive(vm, lambda: cast(IO[bytes], proc.stdin), None)
        except BrokenPipeError:
            pass  # the node stopped reading: its answer below says why
        finally:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            proc.stdin = None  # communicate() would flush it again
        out, err = proc.communicate(timeout=600)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise node.failed(proc.returncode, err)
    failpoint("bmove:sent")
    return node.checked("bimport mode=stage", node_answers.staging_id,
                        out.decode(errors="replace"))


