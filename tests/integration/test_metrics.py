"""Metrics (issue 24, docs/metrics.md): the exposition `cbsd bmetrics` prints (and the service
serves at /metrics) tells the truth about a real VM: its status, its QEMU's CPU time and
memory, its disk I/O, its checkpoints and how long the newest took, and a QEMU that does not
answer is reported, not waited on. Parsed with prometheus_client's own parser."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Cbsd
from tests.service import Service

pytestmark = pytest.mark.vm

STATUSES = ("On", "Off", "Paused", "Suspended", "Maintenance")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (sample name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def status_of(samples: Samples, jname: str) -> str:
    """The one status whose gauge is 1 (and every other is 0)."""
    on = [st for st in STATUSES if value(samples, "cbsd_vm_status", jname=jname, status=st) == 1]
    off = [st for st in STATUSES if value(samples, "cbsd_vm_status", jname=jname, status=st) == 0]
    assert len(on) == 1 and len(off) == len(STATUSES) - 1, (on, off)
    return on[0]


def bmetrics(cbsd: Cbsd) -> Samples:
    r = cbsd("bmetrics", timeout=60).ok()
    assert r.err == "", r.err
    return parse(r.out)


def wait_for(scrape: Callable[[], Samples], ok: Callable[[Samples], bool],
             what: str, timeout: float = 60) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        s = scrape()
        if ok(s):
            return s
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def check_running_vm(cbsd: Cbsd, scrape: Callable[[], Samples]) -> None:
    """What a scrape must show of running_counter's vm1 after one checkpoint, then stopped."""
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=first").ok()
    s = scrape()
    assert status_of(s, "vm1") == "On"
    assert value(s, "cbsd_vm_checkpoints", jname="vm1") == 1
    assert (value(s, "cbsd_vm_checkpoints_size_bytes", jname="vm1") or 0) > 0
    took = value(s, "cbsd_vm_checkpoint_last_duration_seconds", jname="vm1",
                 checkpoint="first")
    gap = value(s, "cbsd_vm_checkpoint_last_guest_gap_seconds", jname="vm1",
                checkpoint="first")
    assert took is not None and gap is not None and 0 < gap <= took, (took, gap)
    created = value(s, "cbsd_vm_checkpoint_newest_timestamp_seconds", jname="vm1",
                    checkpoint="first")
    listed = cbsd.checkpoints("vm1")
    assert created is not None and listed[0]["name"] == "first"
    assert (value(s, "cbsd_vm_resident_memory_bytes", jname="vm1") or 0) > 0
    assert value(s, "cbsd_vm_monitor_up", jname="vm1") == 1
    # The BIOS read the boot sector from the VM's only disk.
    assert (value(s, "cbsd_vm_disk_read_bytes_total", jname="vm1", disk="dsk1.qcow2")
            or 0) > 0
    assert (value(s, "cbsd_vm_disk_reads_total", jname="vm1", disk="dsk1.qcow2") or 0) > 0
    first = value(s, "cbsd_vm_cpu_seconds_total", jname="vm1")
    assert first is not None
    wait_for(scrape, lambda t: (value(t, "cbsd_vm_cpu_seconds_total", jname="vm1") or 0)
             > first, "the running guest's CPU seconds grow")

    cbsd("bstop", "vm1", "noacpi=1").ok()
    s = scrape()
    assert status_of(s, "vm1") == "Off"
    assert value(s, "cbsd_vm_cpu_seconds_total", jname="vm1") is None, "no QEMU: no CPU time"
    assert value(s, "cbsd_vm_monitor_up", jname="vm1") is None
    assert value(s, "cbsd_vm_checkpoints", jname="vm1") == 1, "the checkpoint stays"


def test_bmetrics_tells_a_running_vm_its_checkpoint_and_its_stop(
        cbsd: Cbsd, running_counter: str) -> None:
    check_running_vm(cbsd, lambda: bmetrics(cbsd))


def timings(s: Samples, checkpoint: str) -> tuple[float | None, float | None]:
    return (value(s, "cbsd_vm_checkpoint_last_duration_seconds", jname="vm1",
                  checkpoint=checkpoint),
            value(s, "cbsd_vm_checkpoint_last_guest_gap_seconds", jname="vm1",
                  checkpoint=checkpoint))


def test_paused_and_busy_vms(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bpause", "vm1", "mode=on").ok()
    assert status_of(bmetrics(cbsd), "vm1") == "Paused"
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=paused").ok()
    took, gap = timings(bmetrics(cbsd), "paused")
    assert took is not None and took > 0 and gap == 0, "a paused guest lost no time to it"
    cbsd("bpause", "vm1", "mode=off").ok()
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=live", "live=1").ok()
    took, gap = timings(bmetrics(cbsd), "live")
    assert took is not None and gap is not None and 0 < gap <= took, (took, gap)
    # A command holding the VM: Maintenance, and its QMP session is left alone (not asked).
    held = cbsd.at_failpoint("save:stopped", "bcheckpoint", "mode=create", "jname=vm1",
                             "name=held")
    try:
        s = bmetrics(cbsd)
        assert status_of(s, "vm1") == "Maintenance"
        assert value(s, "cbsd_vm_monitor_up", jname="vm1") is None
        assert (value(s, "cbsd_vm_cpu_seconds_total", jname="vm1") or 0) > 0
    finally:
        held.resume().ok()
    assert status_of(bmetrics(cbsd), "vm1") == "On"


def test_a_qemu_that_does_not_answer_is_reported_not_waited_on(
        cbsd: Cbsd, running_counter: str) -> None:
    pid = cbsd.pid("vm1")
    os.kill(pid, signal.SIGSTOP)  # alive, but its monitor never answers
    try:
        s = bmetrics(cbsd)  # returns (the harness's timeout would fail it otherwise)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert value(s, "cbsd_vm_monitor_up", jname="vm1") == 0
    assert status_of(s, "vm1") == "On", "alive but silent is not Off (as bls says)"
    assert value(s, "cbsd_vm_disk_reads_total", jname="vm1", disk="dsk1.qcow2") is None
    assert value(bmetrics(cbsd), "cbsd_vm_monitor_up", jname="vm1") == 1


def test_the_service_serves_the_same_at_metrics_with_its_health_and_operations(
        cbsd: Cbsd, running_counter: str) -> None:
    with Service(cbsd.workdir) as svc:
        def scrape() -> Samples:
            r = svc.client.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            return parse(r.text)

        check_running_vm(cbsd, scrape)  # vm1 is Off after it
        failed = svc.wait(svc.client.put("/1.0/instances/vm1/state", json={"action": "pause"}),
                          timeout=120)
        assert failed["status"] == "Failure", failed
        done = svc.wait(svc.client.put("/1.0/instances/vm1/state", json={"action": "start"}),
                        timeout=120)
        assert done["status"] == "Success", done
        # An operation is counted as it publishes its end, just after its waiters are woken.
        s = wait_for(scrape, lambda t: value(t, "cbsd_operations_ended_total",
                                             status="Success") == 1, "the start is counted")
        assert value(s, "cbsd_operations_started_total") == 2
        assert value(s, "cbsd_operations_ended_total", status="Failure") == 1
        assert value(s, "cbsd_operations_running") == 0
        assert status_of(s, "vm1") == "On"
        assert (value(s, "process_resident_memory_bytes") or 0) > 0
        assert (value(s, "process_cpu_seconds_total") or 0) > 0
        assert (value(s, "cbsd_service_uptime_seconds") or 0) > 0
