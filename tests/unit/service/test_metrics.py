"""The metrics' pure parts (docs/metrics.md): VM facts -> metric families, parsed back with
prometheus_client's own parser; the operation tally; QMP's blockstats matched to the VM's
images; the save timings the manifest records; the service's registry and its router; and the
CLI's start staying free of prometheus_client and FastAPI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from cbsd.core.manage.vmstats import Checkpoints, DiskIO, VMStats, io_of
from cbsd.core.vm.machine import Image
from cbsd.model import Status
from cbsd.service import api_metrics
from cbsd.service.metrics import CONTENT_TYPE, OperationTally, ServiceMetrics, families
from cbsd.storage.manifest import Manifest, Timings
from cbsd.storage.paths import Workdir
from tests.unit.storage.test_manifest import sample

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


def exposed(metrics: list[Metric]) -> Samples:
    registry = CollectorRegistry()
    registry.register(_Fixed(metrics))
    return parse(generate_latest(registry).decode())


RUNNING = VMStats("vm1", Status.ON, 2, 1 << 30, pid=42, cpu_seconds=12.5, rss=300 << 20,
                  monitor_up=True, disks=[DiskIO("dsk1.qcow2", 1000, 2000, 3, 4)],
                  checkpoints=Checkpoints(2, 5 << 20, "b", 1000.0, Timings(0.8, 0.3)))
OFF = VMStats("vm2", Status.OFF, 1, 1 << 29)


def test_a_running_vm_and_an_off_one() -> None:
    s = exposed(families([RUNNING, OFF], damaged=1, now=1060.0))
    for jname, status in (("vm1", "On"), ("vm2", "Off")):
        shown = {st.value: s[("cbsd_vm_status", (("jname", jname), ("status", st.value)))]
                 for st in Status}
        assert shown == {st.value: float(st.value == status) for st in Status}
    assert s[("cbsd_vm_cpu_seconds_total", (("jname", "vm1"),))] == 12.5
    assert s[("cbsd_vm_resident_memory_bytes", (("jname", "vm1"),))] == 300 << 20
    assert s[("cbsd_vm_monitor_up", (("jname", "vm1"),))] == 1
    disk = (("disk", "dsk1.qcow2"), ("jname", "vm1"))
    assert (s[("cbsd_vm_disk_read_bytes_total", disk)], s[("cbsd_vm_disk_written_bytes_total",
            disk)], s[("cbsd_vm_disk_reads_total", disk)],
            s[("cbsd_vm_disk_writes_total", disk)]) == (1000, 2000, 3, 4)
    ck = (("checkpoint", "b"), ("jname", "vm1"))
    assert s[("cbsd_vm_checkpoints", (("jname", "vm1"),))] == 2
    assert s[("cbsd_vm_checkpoints_size_bytes", (("jname", "vm1"),))] == 5 << 20
    assert s[("cbsd_vm_checkpoint_newest_timestamp_seconds", ck)] == 1000
    assert s[("cbsd_vm_checkpoint_newest_age_seconds", ck)] == 60
    assert s[("cbsd_vm_checkpoint_last_duration_seconds", ck)] == 0.8
    assert s[("cbsd_vm_checkpoint_last_guest_gap_seconds", ck)] == 0.3
    assert s[("cbsd_inventory_damaged_entries", ())] == 1
    # An Off VM has no process, no monitor and no checkpoint to date: those samples are
    # absent, not 0 (a 0 would read as "used no CPU" or "checkpointed in 1970").
    vm2 = {name for name, labels in s if ("jname", "vm2") in labels}
    assert vm2 == {"cbsd_vm_status", "cbsd_vm_cpus", "cbsd_vm_ram_bytes", "cbsd_vm_checkpoints",
                   "cbsd_vm_checkpoints_size_bytes"}


def test_a_checkpoint_saved_before_timings_were_recorded_has_none() -> None:
    old = VMStats("vm1", Status.OFF, 1, 1, checkpoints=Checkpoints(1, 10, "a", 5.0, None))
    names = {name for name, _ in exposed(families([old], 0, 10.0))}
    assert "cbsd_vm_checkpoint_newest_age_seconds" in names
    assert "cbsd_vm_checkpoint_last_duration_seconds" not in names


def test_the_tally_counts_each_operation_once_by_outcome() -> None:
    t = OperationTally()
    for op, status in [("a", "Running"), ("a", "Running"), ("b", "Running"), ("a", "Failure"),
                       ("a", "Failure"), ("c", "Success")]:  # c: started before the tally
        t.observe(op, status)
    s = exposed(t.collect())
    assert s[("cbsd_operations_started_total", ())] == 2
    assert s[("cbsd_operations_ended_total", (("status", "Failure"),))] == 1
    assert s[("cbsd_operations_ended_total", (("status", "Success"),))] == 0
    assert s[("cbsd_operations_running", ())] == 1
    t.observe("b", "Cancelled")
    s = exposed(t.collect())
    assert s[("cbsd_operations_ended_total", (("status", "Cancelled"),))] == 1
    assert s[("cbsd_operations_running", ())] == 0


def test_blockstats_are_matched_to_the_images_by_node() -> None:
    vm: Any = SimpleNamespace(images=lambda: [Image("dsk1.qcow2", "disk0", "/x/dsk1.qcow2"),
                                              Image("dsk2.qcow2", "disk1", "/x/dsk2.qcow2")])
    reply = [
        {"device": "", "node-name": "cd0", "stats": {"rd_bytes": 9}},
        {"device": "", "node-name": "disk1", "stats": {"rd_bytes": 1, "wr_bytes": 2,
                                                       "rd_operations": 3,
                                                       "wr_operations": 4}},
        {"device": "", "qdev": "no-node-name", "stats": {"rd_bytes": 7}},
    ]
    assert io_of(vm, reply) == [DiskIO("dsk2.qcow2", 1, 2, 3, 4)]


def test_the_manifest_keeps_the_save_timings() -> None:
    m = sample()
    assert m.timings is None
    m.timings = Timings(1.25, 0.5)
    back = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert back.timings == Timings(1.25, 0.5)
    older = m.to_json()
    del older["timings"]  # a state saved before the record: reads as None
    assert Manifest.from_json(older).timings is None


def test_the_service_adds_its_own_health(tmp_path: Path) -> None:
    metrics = ServiceMetrics(lambda: Workdir(tmp_path / "wd"))
    metrics.tally.observe("x", "Running")
    names = {name for name, _ in parse(metrics.exposition().decode())}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes",
            "cbsd_service_uptime_seconds", "cbsd_service_start_time_seconds",
            "cbsd_operations_started_total", "cbsd_operations_running",
            "cbsd_inventory_damaged_entries", "cbsd_scrape_duration_seconds"} <= names


def test_the_router_serves_the_text_format(tmp_path: Path) -> None:
    app = FastAPI()
    app.include_router(api_metrics.router)
    app.state.workdir = Workdir(tmp_path / "wd")
    r = TestClient(app).get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE
    assert ("cbsd_inventory_damaged_entries", ()) in parse(r.text)
    assert api_metrics.for_app(app) is api_metrics.for_app(app), "one tally per app"


def imported(tmp_path: Path, *args: str) -> set[str]:
    """Every module `python -m cbsd ARGS` imports (it must succeed)."""
    env = {"CBSD_WORKDIR": str(tmp_path / "wd"), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "cbsd", *args],
                       capture_output=True, text=True, env=env, timeout=60, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return {ln.rsplit("|", 1)[1].strip() for ln in p.stderr.splitlines()
            if ln.startswith("import time:")}


def test_the_cli_loads_prometheus_client_only_for_bmetrics_and_never_fastapi(
        tmp_path: Path) -> None:
    assert not {"prometheus_client", "fastapi", "pydantic"} & imported(tmp_path, "bls")
    mods = imported(tmp_path, "bmetrics")
    assert "prometheus_client" in mods and not {"fastapi", "pydantic", "uvicorn"} & mods


def test_bmetrics_refuses_arguments_in_one_line(tmp_path: Path) -> None:
    for arg, says in (("x=1", "bmetrics: unknown key 'x' (it takes none)"),
                      ("vm1", "bmetrics: unexpected argument 'vm1'")):
        p = subprocess.run([sys.executable, "-m", "cbsd", "bmetrics", arg], capture_output=True,
                           text=True, env={"CBSD_WORKDIR": str(tmp_path / "wd")}, timeout=60,
                           check=False)
        assert p.returncode == 2 and p.stdout == "", p
        assert p.stderr.startswith(says) and p.stderr.count("\n") == 1, p.stderr
