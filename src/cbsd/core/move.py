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
is the node's only and is removed here.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from typing import IO, cast

from cbsd.core import lifecycle, nodes, transfer
from cbsd.core.context import Context
from cbsd.core.model import Status
from cbsd.core.vm import VM
from cbsd.errors import CbsdError, StateError
from cbsd.failpoints import failpoint
from cbsd.storage.atomic import write_atomic


def move(ctx: Context, jname: str, node_name: str) -> str:
    node = nodes.get(ctx, node_name)
    started = time.monotonic()
    status = transfer.status_of(ctx, jname)
    was_running = status in (Status.ON, Status.PAUSED)
    if was_running:
        from cbsd.core import hibernate

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


def _send_and_commit(vm: VM, node: nodes.Node) -> None:
    ctx, jname = vm.ctx, vm.jname
    intent = ctx.workdir.moving(jname)
    write_atomic(intent, json.dumps({"node": node.name, "id": None}).encode())
    try:
        ident = _send(vm, node)
    except BaseException:
        intent.unlink(missing_ok=True)
        raise
    write_atomic(intent, json.dumps({"node": node.name, "id": ident}).encode())
    failpoint("bmove:staged")  # from here recovery asks the node (settle)
    node.call(["bimport", "mode=commit", f"id={ident}"])
    failpoint("bmove:committed")
    lifecycle.remove_held(ctx, vm)


def _send(vm: VM, node: nodes.Node) -> str:
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
    return out.decode().strip().splitlines()[-1]


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
        from cbsd.core import migrate

        migrate.settle(vm, node_name, [int(x) for x in record.get("ssh", [])])
        return
    if ident is None:
        intent.unlink()
        return
    try:
        answer = nodes.get(ctx, node_name).call(["bimport", "mode=abort", f"id={ident}"],
                                                timeout=120).strip()
    except CbsdError as e:
        raise StateError(f"{jname}: an interrupted bmove to node {node_name} cannot be "
                         f"settled until the node answers ({e}); the VM is kept here "
                         "meanwhile, unusable: retry any command") from None
    if not answer.startswith("committed"):
        intent.unlink()  # the node dropped what it had staged: the VM stays here
        return
    lifecycle.remove_held(ctx, vm)
    raise StateError(f"{jname}: it was moved to node {node_name} (an interrupted bmove was "
                     f"completed): use node={node_name}")
