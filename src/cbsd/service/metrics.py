"""Prometheus metrics: every VM of this host as the CLI sees it, and the service's own health.

A custom collector (prometheus_client's `Collector`): each scrape reads the truth again
(core/manage/vmstats.py: inventory, derived status, /proc, QMP with a short timeout), so the
numbers can never drift from what `cbsd bls` says. The same exposition is served at GET
/metrics (service/api_metrics.py) and printed by `cbsd bmetrics` (for node_exporter's textfile
collector on a host without the service); the service adds the process collector (its CPU and
memory), its uptime and its operations, and reads the VMs through its list's row cache
(service/rowcache.py: a VM with no QEMU is read again only when a file or inventory entry it
is derived from changed). Every metric, label and meaning: docs/metrics.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from cbsd.core.manage import vmstats
from cbsd.core.manage.vmstats import VMStats
from cbsd.core.vm.context import Context
from cbsd.model import Status
from cbsd.storage.paths import Workdir

# The classic text format (0.0.4): what every Prometheus and node_exporter's textfile
# collector read.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
OUTCOMES = ("Success", "Failure", "Cancelled")


class Source(Protocol):
    """(every VM's facts, the damaged entries): vmstats.gather, or the service's row cache's
    stats() (the same facts, kept for a VM whose files did not change)."""

    def __call__(self, ctx: Context, *, timeout: float) -> tuple[list[VMStats], list[str]]: ...


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ("jname",)) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"cbsd_{name}", doc, labels=list(labels))


def _counter(name: str, doc: str, labels: tuple[str, ...] = ("jname",)) -> CounterMetricFamily:
    return CounterMetricFamily(f"cbsd_{name}", doc, labels=list(labels))


def families(stats: list[vmstats.VMStats], damaged: int, now: float) -> list[Metric]:
    """Pure: the VMs' facts -> metric families (docs/metrics.md lists them)."""
    status = _gauge("vm_status", "1 for the VM's status now (On, Off, Paused, Suspended, "
                    "Maintenance), 0 for the others", ("jname", "status"))
    cpus = _gauge("vm_cpus", "virtual CPUs, as defined")
    ram = _gauge("vm_ram_bytes", "guest RAM, as defined")
    cpu = _counter("vm_cpu_seconds", "CPU time (user + system) of the VM's QEMU process; "
                   "only while one runs")
    rss = _gauge("vm_resident_memory_bytes", "resident memory of the VM's QEMU process")
    up = _gauge("vm_monitor_up", "1 if QEMU answered its monitor within the scrape's timeout, "
                "0 if not; absent when not asked (no QEMU, or Maintenance)")
    disk = ("jname", "disk")
    rd = _counter("vm_disk_read_bytes", "bytes the guest read from this disk image", disk)
    wr = _counter("vm_disk_written_bytes", "bytes the guest wrote to this disk image", disk)
    rdo = _counter("vm_disk_reads", "read requests the guest made of this disk image", disk)
    wro = _counter("vm_disk_writes", "write requests the guest made of this disk image", disk)
    count = _gauge("vm_checkpoints", "checkpoints the VM has")
    size = _gauge("vm_checkpoints_size_bytes", "bytes of the VM's checkpoints' own files")
    ck = ("jname", "checkpoint")
    created = _gauge("vm_checkpoint_newest_timestamp_seconds",
                     "when the newest checkpoint was created (Unix time)", ck)
    age = _gauge("vm_checkpoint_newest_age_seconds", "age of the newest checkpoint", ck)
    took = _gauge("vm_checkpoint_last_duration_seconds",
                  "how long the newest checkpoint took to save", ck)
    gap = _gauge("vm_checkpoint_last_guest_gap_seconds",
                 "how long the guest stood still for the newest checkpoint", ck)
    for s in stats:
        j = s.jname
        for st in Status:
            status.add_metric([j, st.value], 1.0 if s.status is st else 0.0)
        cpus.add_metric([j], s.cpus)
        ram.add_metric([j], s.ram)
        if s.pid:
            cpu.add_metric([j], s.cpu_seconds)
            rss.add_metric([j], s.rss)
        if s.monitor_up is not None:
            up.add_metric([j], 1.0 if s.monitor_up else 0.0)
        for d in s.disks:
            rd.add_metric([j, d.disk], d.read_bytes)
            wr.add_metric([j, d.disk], d.write_bytes)
            rdo.add_metric([j, d.disk], d.read_ops)
            wro.add_metric([j, d.disk], d.write_ops)
        c = s.checkpoints
        count.add_metric([j], c.count)
        size.add_metric([j], c.size)
        if c.newest is not None and c.newest_created is not None:
            created.add_metric([j, c.newest], c.newest_created)
            age.add_metric([j, c.newest], max(0.0, now - c.newest_created))
        if c.newest is not None and c.newest_timings is not None:
            took.add_metric([j, c.newest], c.newest_timings.seconds)
            gap.add_metric([j, c.newest], c.newest_timings.guest_gap)
    bad = GaugeMetricFamily("cbsd_inventory_damaged_entries", "inventory entries that cannot "
                            "be read (bls names them on stderr); their VMs are not listed")
    bad.add_metric([], damaged)
    return [status, cpus, ram, cpu, rss, up, rd, wr, rdo, wro, count, size, created, age,
            took, gap, bad]


class VMCollector(Collector):
    """Every VM in the workdir's inventory, read afresh at each scrape (by *source*)."""

    def __init__(self, workdir: Callable[[], Workdir], timeout: float = vmstats.TIMEOUT,
                 source: Source = vmstats.gather) -> None:
        self.workdir = workdir
        self.timeout = timeout
        self.source = source

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        ctx = Context(self.workdir(), writable=False)
        try:
            stats, damaged = self.source(ctx, timeout=self.timeout)
        finally:
            if "inventory" in ctx.__dict__:  # opened (a cached_property): this thread's
                ctx.inventory.close()
        yield from families(stats, len(damaged), time.time())
        took = GaugeMetricFamily("cbsd_scrape_duration_seconds",
                                 "how long reading every VM's facts took in this scrape")
        took.add_metric([], time.monotonic() - started)
        yield took


class OperationTally:
    """The service's operations, counted as they start and end (the service keeps only the
    recent ones: counting them at scrape time would lose the rest). service/operations.py
    calls observe() with each change it publishes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self.started = 0
        self.ended = dict.fromkeys(OUTCOMES, 0)

    def observe(self, op_id: str, status: str) -> None:
        with self._lock:
            if status == "Running":
                if op_id not in self._running:
                    self._running.add(op_id)
                    self.started += 1
            elif op_id in self._running:  # counted once, when it ends
                self._running.discard(op_id)
                self.ended[status] = self.ended.get(status, 0) + 1

    def collect(self) -> list[Metric]:
        with self._lock:
            started = CounterMetricFamily("cbsd_operations_started", "operations the "
                                          "service started since it started")
            started.add_metric([], self.started)
            ended = CounterMetricFamily("cbsd_operations_ended", "operations that ended, by "
                                        "outcome (Failure: the failures)", labels=["status"])
            for outcome, n in sorted(self.ended.items()):
                ended.add_metric([outcome], n)
            running = GaugeMetricFamily("cbsd_operations_running", "operations running now")
            running.add_metric([], len(self._running))
            return [started, ended, running]


class ServiceCollector(Collector):
    """The service's own: its start time, uptime and operations."""

    def __init__(self, tally: OperationTally) -> None:
        self.tally = tally
        self.started = time.time()
        self._monotonic = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        start = GaugeMetricFamily("cbsd_service_start_time_seconds",
                                  "when this service started (Unix time)")
        start.add_metric([], self.started)
        uptime = GaugeMetricFamily("cbsd_service_uptime_seconds", "how long it has run")
        uptime.add_metric([], time.monotonic() - self._monotonic)
        yield start
        yield uptime
        yield from self.tally.collect()


def vm_registry(workdir: Callable[[], Workdir],
                source: Source = vmstats.gather) -> CollectorRegistry:
    """What `cbsd bmetrics` prints: the VMs only (a one-shot command has no health to tell)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VMCollector(workdir, source=source))
    return registry


class ServiceMetrics:
    """The service's registry: the VMs, the process (CPU, memory, fds: prometheus_client's
    process collector), uptime and operations. One per service; `tally` is what its
    operations report to; *source* reads the VMs (the service passes its row cache's)."""

    def __init__(self, workdir: Callable[[], Workdir], source: Source = vmstats.gather) -> None:
        self.tally = OperationTally()
        self.registry = vm_registry(workdir, source)
        ProcessCollector(registry=self.registry)
        self.registry.register(ServiceCollector(self.tally))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def exposition(workdir: Callable[[], Workdir]) -> bytes:
    return generate_latest(vm_registry(workdir))
