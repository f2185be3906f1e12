"""The disk clusters a replication ships (core/cluster/ship.py): only those written since the
last generation the standby acknowledged, as QEMU itself tracks and copies them.

Each replication adds a dirty bitmap `cbsd-ha-G` to every image's node in the same QMP
transaction as the checkpoint's internal snapshots (the vCPUs stopped: save.Along), so the
bitmap counts every write after snapshot G. The next replication, based on the acknowledged
B, starts in that same transaction a `blockdev-backup` of each image with `sync=bitmap`,
bitmap `cbsd-ha-B`, `bitmap-mode=never` (the bitmap stays as it is, whatever happens): QEMU
copies the clusters written since B, as of the instant of the new snapshot (copy-before-write
keeps that instant while the guest runs on), into a fresh sparse qcow2 -- the delta, which
has exactly those clusters allocated. Once the standby acknowledged G, every other cbsd-ha-*
bitmap is removed; if the replication failed, cbsd-ha-G is removed and B stays the base.

The bitmaps are not persistent: QEMU 7.2 refuses to revert an image that holds persistent
bitmaps to an internal snapshot ("Device has active dirty bitmaps"), which every restore of
a checkpoint does. A VM whose QEMU restarted has none: its next replication ships its disks
in full (the snapshot's contents, read from the image in use with qemu-img -U)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbsd.core.checkpoint.save import Along
from cbsd.core.vm.machine import VM, Image
from cbsd.errors import CbsdError, QemuError, QmpCommandError
from cbsd.qemu import img

BITMAP = "cbsd-ha-"
NODE = "cbsd-ha-delta-"  # the delta target's node (and the backup job's id)
JOB_TIMEOUT = 3600.0


@dataclass
class Plan:
    """Which images go as a delta (their index in vm.images() -> the delta's file) and which
    in full, for generation *gen* based on *base*."""
    gen: int
    base: int | None
    deltas: dict[int, Path] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # delta nodes added to QEMU

    def mode(self, i: int) -> str:
        return "delta" if i in self.deltas else "full"


def _bitmaps(vm: VM) -> dict[str, set[str]]:
    nodes = vm.monitor().cmd("query-named-block-nodes", flat=True)
    return {n["node-name"]: {b["name"] for b in n.get("dirty-bitmaps", [])} for n in nodes}


def prepare(vm: VM, scratch: Path, gen: int, base: int | None) -> Plan:
    """A delta target for every image whose QEMU has the base's bitmap (added to QEMU as a
    node, empty); the others go in full. First, whatever delta job or node an earlier
    replication left in this QEMU (cut short before its close: killed, or its close failed)
    goes: the VM's lock is held, so every one there is stale, and one left would make the
    blockdev-add of its name fail until QEMU restarts. A failure part-way removes what this
    one added."""
    clear(vm)
    plan = Plan(gen, base)
    if base is None:
        return plan
    try:
        have = _bitmaps(vm)
        mon = vm.monitor()
        for i, image in enumerate(vm.images()):
            if f"{BITMAP}{base}" not in have.get(image.node, set()):
                continue
            path = scratch / f"{image.name}.delta"
            img.create(path, int(img.info(Path(image.path))["virtual-size"]))
            mon.cmd("blockdev-add", driver="qcow2", **{"node-name": f"{NODE}{i}"},
                    file={"driver": "file", "filename": str(path)})
            plan.added.append(f"{NODE}{i}")
            plan.deltas[i] = path
    except BaseException:
        with contextlib.suppress(CbsdError):
            close(vm, plan)
        raise
    return plan


def along(plan: Plan) -> Along:
    """The actions taken with the snapshots: the new bitmap on every image, the backups."""
    def actions(tags: list[tuple[Image, str]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i, (image, _) in enumerate(tags):
            out.append({"type": "block-dirty-bitmap-add", "data": {
                "node": image.node, "name": f"{BITMAP}{plan.gen}", "persistent": False}})
            if i in plan.deltas:
                out.append({"type": "blockdev-backup", "data": {
                    "job-id": f"{NODE}{i}", "device": image.node, "target": f"{NODE}{i}",
                    "sync": "bitmap", "bitmap": f"{BITMAP}{plan.base}",
                    "bitmap-mode": "never", "auto-finalize": False, "auto-dismiss": False}})
        return out
    return actions


def finish(vm: VM, plan: Plan) -> None:
    """Wait for the backups (the guest runs meanwhile), then close their targets: each delta
    is then a complete qcow2. QemuError if a backup failed."""
    mon = vm.monitor()
    deadline = time.monotonic() + JOB_TIMEOUT
    pending = {f"{NODE}{i}" for i in plan.deltas}
    while pending:
        jobs = {j["id"]: j for j in mon.cmd("query-jobs")}
        for job_id in sorted(pending):
            job = jobs.get(job_id)
            if job is None:
                raise QemuError(f"{vm.jname}: the disk delta's job {job_id} is gone")
            if job["status"] == "pending":  # copied: finalized now, after the save
                mon.cmd("job-finalize", id=job_id)
            elif job["status"] == "concluded":
                mon.cmd("job-dismiss", id=job_id)
                pending.discard(job_id)
                if job.get("error"):
                    raise QemuError(f"{vm.jname}: copying the disk delta failed: "
                                    f"{job['error']}")
        if pending:
            if time.monotonic() > deadline:
                raise QemuError(f"{vm.jname}: the disk delta was not copied within "
                                f"{JOB_TIMEOUT:.0f} s")
            time.sleep(0.01)
    close(vm, plan)


def close(vm: VM, plan: Plan) -> None:
    """Cancel what still runs and remove the delta nodes (after finish, or on a failure)."""
    if not plan.added:
        return
    clear(vm)
    plan.added.clear()


def clear(vm: VM) -> None:
    """Every cbsd-ha-delta-* job cancelled and dismissed, every such node deleted (the
    caller holds the VM's lock: none belongs to a replication still running)."""
    if not vm.alive():
        return
    mon = vm.monitor()
    for job in mon.cmd("query-jobs"):
        if job["id"].startswith(NODE):
            with contextlib.suppress(CbsdError):
                if job["status"] != "concluded":
                    mon.cmd("job-cancel", id=job["id"])
                _wait_concluded(vm, job["id"])
                mon.cmd("job-dismiss", id=job["id"])
    for node in mon.cmd("query-named-block-nodes", flat=True):
        if str(node["node-name"]).startswith(NODE):
            _delete_node(vm, node["node-name"])


def _delete_node(vm: VM, node: str, timeout: float = 30.0) -> None:
    """blockdev-del, again while QEMU says the node is in use: a backup job releases its
    target a moment after it is dismissed (QEMU 7.2 answers "in use" in between, and a
    target left attached there was seen to crash QEMU at the guest's next writes)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            vm.monitor().cmd("blockdev-del", **{"node-name": node})
            return
        except QmpCommandError as e:
            if "in use" not in e.desc or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def _wait_concluded(vm: VM, job_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {j["id"]: j for j in vm.monitor().cmd("query-jobs")}
        if job_id not in jobs or jobs[job_id]["status"] == "concluded":
            return
        time.sleep(0.01)


def keep_only(vm: VM, gen: int | None) -> None:
    """Remove every cbsd-ha-* bitmap but generation *gen*'s (None: all of them)."""
    if not vm.alive():
        return
    mon = vm.monitor()
    for node, names in _bitmaps(vm).items():
        for name in sorted(names):
            if name.startswith(BITMAP) and name != f"{BITMAP}{gen}":
                with contextlib.suppress(CbsdError):
                    mon.cmd("block-dirty-bitmap-remove", node=node, name=name)


def drop(vm: VM, gen: int) -> None:
    """After a failed replication: generation *gen*'s bitmap goes, the base's stays."""
    if not vm.alive():
        return
    mon = vm.monitor()
    for node, names in _bitmaps(vm).items():
        if f"{BITMAP}{gen}" in names:
            with contextlib.suppress(CbsdError):
                mon.cmd("block-dirty-bitmap-remove", node=node, name=f"{BITMAP}{gen}")
