"""bmigrate: a running VM, its memory and its disks, to another node while it runs; no shared
storage. QEMU does the work and OpenSSH carries it; cbsd only sequences it.

  node:  `cbsd bmigrate mode=incoming` (over the control ssh, JSON lines on stdin/stdout)
         creates the VM's folder under the unfinished mark, empty disks of the same sizes
         (for a VM with checkpoints: receives them first, with disks that hold their disk
         snapshots and an empty active layer, core/hosts/migrate_ckp.py), starts its QEMU
         waiting for a migration (late-block-activate: the disks are taken only at `cont`),
         exports the disks writable over NBD on a Unix socket, and answers
         the two sockets' paths. Nothing is registered.
  here:  a second `ssh -N -L` forwards both sockets; each disk is mirrored into its export
         (blockdev-mirror sync=full) until all are in step, then the memory is migrated with
         pause-before-switchover: with the vCPUs stopped the mirrors are completed (the last
         writes reach the node) and the switchover goes on.
  node:  told "go", waits for the migration to complete, stops NBD, registers the VM,
         `cont`s it and answers "running". Only then is the VM removed here.
Any failure before "go": the migration and mirrors are cancelled, the node ends its QEMU and
clears its files (an ssh that drops is a failure), and the VM runs on here as before. The one
instant that needs recovery is a drop after "go": the intent file (jails-system/VM/moving)
makes the next command here ask the node (`mode=status`, under the VM's lock there).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import IO, Any, cast

from cbsd import node_answers
from cbsd.core.checkpoint import compat, generation, tree
from cbsd.core.cluster import admin
from cbsd.core.hosts import migrate_ckp
from cbsd.core.vm import snapshots
from cbsd.core.vm.context import Context
from cbsd.core.vm.definition import remove_held
from cbsd.core.vm.machine import VM
from cbsd.core.vm.moving import MIRROR, drop_mirror_nodes, mirror_of, node_named
from cbsd.errors import CbsdError, CheckpointError, NodeError, QemuError, StateError
from cbsd.failpoints import failpoint
from cbsd.model import Action, Status, require
from cbsd.qemu import img, migration
from cbsd.qemu.qmp import Monitor
from cbsd.qemu.runstate import MigrationStatus
from cbsd.ssh import Node, die_with_parent, last_line
from cbsd.storage import ckpstore
from cbsd.storage.atomic import write_atomic

READY_TIMEOUT = 120.0
MIRROR_TIMEOUT = 3600.0
# A cancelled migration is over once its status leaves these.
_CANCELLING = frozenset({MigrationStatus.CANCELLING, MigrationStatus.ACTIVE,
                         MigrationStatus.PRE_SWITCHOVER, MigrationStatus.DEVICE})


def why_not(vm: VM) -> str | None:
    """Why this VM cannot migrate live (pure checks on what is here)."""
    images = {im.name for im in vm.images()}
    for name, path in migrate_ckp.states(vm).items():
        try:
            disks = {s.disk for s in ckpstore.read_manifest(path).disk_snapshots}
        except CheckpointError as e:
            return f"{e} (bcheckpoint mode=verify)"
        if disks - images:
            return (f"checkpoint {name} has a snapshot in {sorted(disks - images)[0]}, an "
                    "image the VM no longer uses, which QEMU's mirror cannot carry (only the "
                    "VM's whole folder can): use bmove, or destroy that checkpoint")
    if snapshots.any_held(vm):
        return ("it has disk snapshots (bsnapshot), which QEMU's disk mirror cannot carry: "
                "use bmove, or destroy them first")
    if vm.ctx.host.accel == "kvm":
        return ("under KVM its guest sees this host's own CPU (-cpu host), which cannot "
                "migrate: use bmove (hibernate, move, resume)")
    return None


# --- this side ----------------------------------------------------------------------------

def migrate(ctx: Context, jname: str, node_name: str) -> str:
    node = node_named(ctx, node_name)
    with ctx.locked_vm(jname, "bmigrate") as vm:
        require(jname, vm.status(mine=True), Action.MIGRATE)
        why = why_not(vm)
        if why:
            raise StateError(f"{jname}: cannot migrate live: {why}")
        downtime = _migrate_held(vm, node)
    return f"{jname}: migrated to node {node.name} (downtime {downtime * 1000:.0f} ms)"


def _migrate_held(vm: VM, node: Node) -> float:
    wd, jname = vm.ctx.workdir, vm.jname
    paused = vm.status(mine=True) is Status.PAUSED
    carried = bool(migrate_ckp.states(vm))
    sizes = {im.name: int(img.info(Path(im.path))["virtual-size"]) for im in vm.images()}
    # On a cluster node, the switchover comes first: the node's half registers the VM only
    # if the cluster says the node owns it; a migration that fails takes it back.
    take_back = admin.hand_over(wd, jname, node.name)
    control = subprocess.Popen(node.argv(["bmigrate", "mode=incoming", f"jname={jname}"]),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    forward: subprocess.Popen[bytes] | None = None
    mon = vm.monitor()
    local = {k: wd.system(jname) / f"{k[:3]}.sock" for k in ("nbd", "migration")}
    went = False
    try:
        # The same guest continues there: the node's QEMU has the vmgenid device exactly when
        # this one has (its state is in the stream) and keeps the ID (not a fork).
        _send(control, {"spec": vm.spec.to_dict(), "sizes": sizes, "paused": paused,
                        "source": {"qemu": vm.ctx.host.version, "accel": vm.ctx.host.accel,
                                   "cpu": compat.cpu_signature(vm.ctx.host)},
                        "genid": generation.current(vm, mon),
                        "checkpoints": (tree.current(wd, jname) or "") if carried else None})
        if carried:  # before the mirror: the node's disks are built from them
            with contextlib.suppress(BrokenPipeError):  # the node ended: _receive says why
                migrate_ckp.send(vm, cast(IO[bytes], control.stdin))
        ready = node.checked("bmigrate mode=incoming", node_answers.migrate_sockets,
                             _receive(control, node, READY_TIMEOUT))
        forward = _forward(node, local, ready)
        failpoint("bmigrate:forwarded")
        _mirror(mon, vm, local["nbd"])
        failpoint("bmigrate:mirrored")
        downtime_ms = _migrate_memory(mon, vm, local["migration"])
        stopped = time.monotonic()
        # From here a kill leaves the VM paused here, the node waiting: settle() decides.
        write_atomic(wd.moving(jname), json.dumps({
            "node": node.name, "live": True,
            "ssh": [p.pid for p in (control, forward) if p is not None]}).encode())
        failpoint("bmigrate:migrated")
        if control.poll() is not None:  # the node's half ended: it cannot take the VM
            _receive(control, node, 1)
        went = True
        _send(control, {"go": True})
        node.checked("bmigrate mode=incoming", node_answers.migrate_done,
                     _receive(control, node, READY_TIMEOUT))
        downtime = downtime_ms / 1000 + (time.monotonic() - stopped)
    except BaseException:
        _kill(control, forward)
        if not went:
            _roll_back(mon, vm, paused)
            with contextlib.suppress(CbsdError):  # the node clears a half-received VM
                node.call(["bmigrate", "mode=status", f"jname={jname}"], timeout=60)
            # The node never got the go, so it never registered the VM: it stays here. (After
            # the node's status, whose guard needs the record the switch gave it.)
            take_back()
        raise
    finally:
        for sock in local.values():
            sock.unlink(missing_ok=True)
    _kill(control, forward)
    vm.power_off()
    remove_held(vm.ctx, vm)
    return downtime


def _send(p: subprocess.Popen[bytes], message: dict[str, Any]) -> None:
    assert p.stdin is not None
    try:
        p.stdin.write(json.dumps(message).encode() + b"\n")
        p.stdin.flush()
    except BrokenPipeError:
        pass  # the node ended: the next _receive says why


def _receive(p: subprocess.Popen[bytes], node: Node, timeout: float) -> Any:
    """The node's next JSON line (its shape the caller's to check); NodeError with its
    message if it ended instead."""
    assert p.stdout is not None and p.stderr is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    line = p.stdout.readline() if ready else b""
    if line:
        try:
            return json.loads(line)
        except (ValueError, RecursionError):
            raise NodeError(f"node {node.name}: bmigrate there answered what is not "
                                  "JSON (is it a cbsd of this version?)") from None
    try:
        p.wait(10 if ready else 0.1)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise NodeError(f"node {node.name}: no answer in {timeout:.0f} s") from None
    raise node.failed(p.returncode, p.stderr.read())


def _forward(node: Node, local: dict[str, Path], ready: dict[str, str]
             ) -> subprocess.Popen[bytes]:
    """`ssh -N -L` from this host's sockets (in the VM's owner-only folder) to the node's.
    It ends with this process, however that ends (a kill -9 before the intent that names it
    is written would otherwise leave it, and its session on the node, for good)."""
    argv = node.argv([])[:-3]  # ssh and its options, without "--", the host and a command
    for key, path in local.items():
        path.unlink(missing_ok=True)
        argv += ["-L", f"{path}:{ready[key]}"]
    argv += ["-N", "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes",
             "--", node.host]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE,
                         preexec_fn=die_with_parent(os.getpid()))
    deadline = time.monotonic() + READY_TIMEOUT
    while not all(s.exists() for s in local.values()):
        if p.poll() is not None or time.monotonic() > deadline:
            err = p.stderr.read() if p.stderr and p.poll() is not None else b""
            p.kill()
            raise NodeError(f"node {node.name}: ssh could not forward the migration's "
                                  f"sockets: {last_line(err)}")
        time.sleep(0.02)
    return p


def _mirror(mon: Monitor, vm: VM, nbd: Path) -> None:
    """Every writable disk mirrored into the node's export of it, until all are in step."""
    for node_name in (im.node for im in vm.images()):
        mon.cmd("blockdev-add", driver="nbd", **{"node-name": mirror_of(node_name)},
                server={"type": "unix", "path": str(nbd)}, export=node_name)
        mon.cmd("blockdev-mirror", **{"job-id": mirror_of(node_name)}, device=node_name,
                target=mirror_of(node_name), sync="full")
    deadline = time.monotonic() + MIRROR_TIMEOUT
    while True:
        jobs = {j["device"]: j for j in mon.cmd("query-block-jobs")}
        mine = [jobs.get(mirror_of(im.node)) for im in vm.images()]
        if any(j is None for j in mine):
            raise QemuError(f"{vm.jname}: a disk mirror to the node ended early")
        if all(j is not None and j.get("ready") for j in mine):
            return
        if time.monotonic() > deadline:
            raise QemuError(f"{vm.jname}: the disks did not get in step with the node's")
        time.sleep(0.05)


def _migrate_memory(mon: Monitor, vm: VM, sock: Path) -> float:
    """Migrate the memory; at the switchover (vCPUs stopped) complete the mirrors. QEMU's
    downtime in ms."""
    caps = migration.capabilities(mon)
    if "pause-before-switchover" not in caps:
        raise QemuError(f"{vm.jname}: this QEMU lacks pause-before-switchover")
    migration.set_capabilities(mon, caps, {"pause-before-switchover": True})
    mon.cmd("migrate", uri=f"unix:{sock}")
    while True:
        info = mon.cmd("query-migrate")
        state = info.get("status")
        if state == MigrationStatus.PRE_SWITCHOVER:
            break
        if state in (MigrationStatus.FAILED, MigrationStatus.CANCELLED, None):
            raise QemuError(f"{vm.jname}: the migration failed: "
                            f"{info.get('error-desc', state)}")
        time.sleep(0.01)
    for im in vm.images():
        mon.cmd("block-job-cancel", device=mirror_of(im.node))
    while any(j["device"].startswith(MIRROR) for j in mon.cmd("query-block-jobs")):
        time.sleep(0.005)
    mon.cmd("migrate-continue", state=MigrationStatus.PRE_SWITCHOVER)
    info = mon.wait_migration()
    return float(info.get("downtime", 0))


def _roll_back(mon: Monitor, vm: VM, paused: bool) -> None:
    """After a failure before "go": the VM keeps running here."""
    with contextlib.suppress(CbsdError):
        mon.cmd("migrate_cancel")
        deadline = time.monotonic() + 30
        while mon.cmd("query-migrate").get("status") in _CANCELLING:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
    with contextlib.suppress(CbsdError):
        for job in mon.cmd("query-block-jobs"):
            if str(job["device"]).startswith(MIRROR):
                mon.cmd("block-job-cancel", device=job["device"], force=True)
    drop_mirror_nodes(mon, vm)
    if not paused and vm.alive() and not mon.running():
        mon.cmd("cont")


def _kill(*procs: subprocess.Popen[bytes] | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


