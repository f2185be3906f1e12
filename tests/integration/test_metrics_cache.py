"""The service's GET /metrics reads a VM with no QEMU through its list's row cache
(service/rowcache.py): each scrape must still say what `cbsd bmetrics` (which keeps nothing)
says at that moment -- a status change, a checkpoint made or destroyed, a definition changed,
a QEMU killed -- in the very next scrape, with no wait."""

from __future__ import annotations

import os
import signal

import pytest

from tests.harness import COUNTER_RE, Cbsd
from tests.integration.test_api_list import gone
from tests.integration.test_metrics import Samples, bmetrics, parse, status_of, value
from tests.service import Service

pytestmark = pytest.mark.vm

# What a scrape says of a VM that does not move between two scrapes a moment apart (not
# its QEMU's CPU time, memory or disk I/O, nor a checkpoint's age).
STABLE = ("cbsd_vm_status", "cbsd_vm_cpus", "cbsd_vm_ram_bytes", "cbsd_vm_checkpoints",
          "cbsd_vm_checkpoints_size_bytes", "cbsd_vm_checkpoint_newest_timestamp_seconds",
          "cbsd_vm_checkpoint_last_duration_seconds",
          "cbsd_vm_checkpoint_last_guest_gap_seconds", "cbsd_inventory_damaged_entries")


def stable(s: Samples) -> Samples:
    return {k: v for k, v in s.items() if k[0] in STABLE}


def test_each_change_is_in_the_next_scrape_as_bmetrics_says_it(
        cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    image = counter_image()
    for name in ("vm1", "vm2"):
        cbsd("bcreate", f"jname={name}", f"image={image}", "vm_os_type=other",
             "vm_ram=32m", "vm_dedup=off").ok()
    with Service(cbsd.workdir) as svc:
        def scrape() -> Samples:
            """The service's scrape, and that it equals bmetrics' right after it."""
            r = svc.client.get("/metrics")
            assert r.status_code == 200, r.text
            s = parse(r.text)
            assert stable(s) == stable(bmetrics(cbsd))
            return s

        s = scrape()
        assert (status_of(s, "vm1"), status_of(s, "vm2")) == ("Off", "Off")
        scrape()  # kept: the same facts
        cbsd("bstart", "vm1").ok()
        assert status_of(scrape(), "vm1") == "On"
        cbsd.console("vm1").wait(COUNTER_RE, count=2)
        cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=cp1").ok()
        cbsd("bstop", "vm1", "noacpi=1").ok()
        s = scrape()
        assert status_of(s, "vm1") == "Off"
        assert value(s, "cbsd_vm_checkpoints", jname="vm1") == 1
        assert value(s, "cbsd_vm_checkpoint_last_duration_seconds", jname="vm1",
                     checkpoint="cp1") is not None
        scrape()  # kept, with its checkpoint
        cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=cp1").ok()
        s = scrape()
        assert value(s, "cbsd_vm_checkpoints", jname="vm1") == 0
        assert value(s, "cbsd_vm_checkpoints_size_bytes", jname="vm1") == 0
        cbsd("bset", "jname=vm2", "vm_cpus=2", "vm_ram=64m").ok()
        s = scrape()
        assert (value(s, "cbsd_vm_cpus", jname="vm2"),
                value(s, "cbsd_vm_ram_bytes", jname="vm2")) == (2, 64 << 20)
        # A kept VM hibernated and resumed; then its QEMU killed (no command, no file).
        cbsd("bstart", "vm2").ok()
        cbsd.console("vm2").wait(COUNTER_RE, count=2)
        cbsd("bsuspend", "vm2").ok()
        assert status_of(scrape(), "vm2") == "Suspended"
        cbsd("bstart", "vm2").ok()
        assert status_of(scrape(), "vm2") == "On"
        pid = cbsd.pid("vm2")
        os.kill(pid, signal.SIGKILL)
        gone(pid)
        assert status_of(scrape(), "vm2") == "Off"
        cbsd("bremove", "vm1").ok()
        assert value(scrape(), "cbsd_vm_cpus", jname="vm1") is None
