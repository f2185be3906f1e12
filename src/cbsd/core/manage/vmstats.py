"""What each VM of this host is and costs right now, for the metrics (service/metrics.py,
`cbsd bmetrics`): read from the same truth bls reads, at the moment of asking.

Status is derived as everywhere (VM.status: lock, process, QMP); the QEMU process's CPU time and
resident memory come from /proc; disk I/O from QMP's query-blockstats, asked in the same short
session as the run state. Nothing here waits long on a QEMU: a monitor that does not answer
within the timeout is reported (`monitor_up` False), and the VMs are asked in parallel, so one
wedged QEMU costs a scrape at most one timeout. A VM another command holds (Maintenance) is
not asked at all: that command has QEMU's only QMP session."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import QemuError
from cbsd.model import Status, VMSpec
from cbsd.qemu import process
from cbsd.qemu.qmp import Monitor
from cbsd.storage import ckpstore
from cbsd.storage.manifest import Timings

# QEMU answers a query in about a millisecond; a scrape must not wait on one that does not.
TIMEOUT = 0.5
WORKERS = 8  # VMs asked at once (each ask is mostly waiting on a socket)


@dataclass(frozen=True)
class DiskIO:
    disk: str  # the image's file name under vm/<jname>/ (as manifests name it)
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int


@dataclass(frozen=True)
class Checkpoints:
    count: int = 0
    size: int = 0  # bytes of their own files
    newest: str | None = None
    newest_created: float | None = None  # Unix time
    newest_timings: Timings | None = None  # None: it predates the record, or damaged


@dataclass
class VMStats:
    jname: str
    status: Status
    cpus: int
    ram: int  # bytes, as defined
    pid: int = 0  # the QEMU's, 0 when none runs
    cpu_seconds: float = 0.0
    rss: int = 0  # bytes
    monitor_up: bool | None = None  # None: not asked (no QEMU, or another command holds it)
    disks: list[DiskIO] = field(default_factory=list)
    checkpoints: Checkpoints = field(default_factory=Checkpoints)


def gather(ctx: Context, *, timeout: float = TIMEOUT) -> tuple[list[VMStats], list[str]]:
    """(one VMStats per VM in the inventory, the damaged entries named in one line each)."""
    damaged: list[str] = []
    vms = []
    for jname, spec, pid, port in ctx.inventory.all():
        if isinstance(spec, VMSpec):
            vms.append(VM(ctx, spec, (pid, port)))
        else:
            damaged.append(f"{jname}: {spec}")
    return each(vms, timeout), damaged


def each(vms: list[VM], timeout: float = TIMEOUT) -> list[VMStats]:
    """one() of every VM, in order, asked in parallel (the service's row cache asks only the
    VMs whose facts may have changed: service/rowcache.py)."""
    if not vms:
        return []
    with ThreadPoolExecutor(min(WORKERS, len(vms)), thread_name_prefix="vmstats") as pool:
        return list(pool.map(lambda vm: one(vm, timeout), vms))


def one(vm: VM, timeout: float = TIMEOUT) -> VMStats:
    spec = vm.spec
    disks: list[DiskIO] = []
    status = vm.status(timeout=timeout, also=lambda mon: disks.extend(blockstats(vm, mon)))
    live = status in (Status.ON, Status.PAUSED) or (status is Status.MAINTENANCE
                                                    and vm.alive())
    stats = VMStats(spec.jname, status, spec.cpus, spec.ram,
                    checkpoints=checkpoints(vm))
    if live:
        stats.pid = vm.pid
        stats.cpu_seconds = process.cpu_seconds(vm.pid)
        stats.rss = process.resident_bytes(vm.pid)
        if status is not Status.MAINTENANCE:
            stats.monitor_up = not vm.unresponsive
            stats.disks = disks
    return stats


def blockstats(vm: VM, mon: Monitor) -> list[DiskIO]:
    """The VM's images' I/O counters since QEMU started (query-blockstats, matched by the
    block node each image is attached as); [] if this QEMU refuses the query."""
    try:
        reply = mon.cmd("query-blockstats")
    except QemuError:
        if mon.closed:
            raise  # silent or gone: the status probe reports it
        return []  # refused (QmpCommandError): nothing to report
    return io_of(vm, reply)


def io_of(vm: VM, reply: Iterable[dict[str, object]]) -> list[DiskIO]:
    """Pure: query-blockstats' entries -> one DiskIO per image of the VM that has one."""
    by_node = {}
    for entry in reply:
        stats = entry.get("stats")
        if isinstance(stats, dict):
            by_node[entry.get("node-name")] = stats
    out = []
    for image in vm.images():
        s = by_node.get(image.node)
        if s is not None:
            out.append(DiskIO(image.name, int(s.get("rd_bytes", 0)), int(s.get("wr_bytes", 0)),
                              int(s.get("rd_operations", 0)), int(s.get("wr_operations", 0))))
    return out


def checkpoints(vm: VM) -> Checkpoints:
    """How many checkpoints the VM has, their size, and its newest's time and timings."""
    count = size = 0
    newest = None
    for path, manifest in ckpstore.list_states(vm.ctx.workdir.checkpoints(vm.jname)):
        try:
            size += ckpstore.state_size(path)
        except FileNotFoundError:
            continue  # destroyed while we counted
        count += 1
        newest = (path, manifest)  # list_states: oldest first
    if newest is None:
        return Checkpoints()
    path, m = newest
    return Checkpoints(count, size, ckpstore.state_name(path),
                       m.created_ts if m is not None else None,
                       m.timings if m is not None else None)
