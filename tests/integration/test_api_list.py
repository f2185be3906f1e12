"""GET /1.0/instances keeps each stopped VM's row between requests (service/rowcache.py): the
list must still be true at every request -- whatever a CLI command did meanwhile, and when a
QEMU dies by itself, touching no file (kill -9)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.harness import COUNTER_RE, Cbsd
from tests.service import Service

pytestmark = pytest.mark.vm


def listed(svc: Service) -> dict[str, dict[str, object]]:
    r = svc.client.get("/1.0/instances")
    assert r.status_code == 200, r.text
    return {row["jname"]: row for row in r.json()}


def gone(pid: int, deadline: float = 60) -> None:
    """Wait until *pid* is no longer a live process (a zombie counts as gone: reaped later)."""
    end = time.monotonic() + deadline
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            return
        if state in (b"Z", b"X"):
            return
        assert time.monotonic() < end, f"pid {pid} still alive"
        time.sleep(0.05)


def test_the_list_follows_the_cli_and_a_qemu_killed(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    image = counter_image()
    for name in ("vm1", "vm2"):
        cbsd("bcreate", f"jname={name}", f"image={image}", "vm_os_type=other",
             "vm_ram=32m", "vm_dedup=off").ok()
    with Service(cbsd.workdir) as svc:
        first = listed(svc)
        assert (first["vm1"]["status"], first["vm2"]["status"]) == ("Off", "Off")
        assert listed(svc) == first  # kept rows: the same facts
        # A CLI command changes a kept row: the next request shows it, with no wait.
        cbsd("bstart", "vm1").ok()
        rows = listed(svc)
        assert (rows["vm1"]["status"], rows["vm2"]["status"]) == ("On", "Off")
        cbsd.console("vm1").wait(COUNTER_RE, count=2)
        cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=cp1").ok()
        assert listed(svc)["vm1"]["checkpoints"] == 1
        # kill -9 of the QEMU: no cbsd command runs, no file of the VM changes.
        pid = int(str(listed(svc)["vm1"]["jid"]))
        assert pid > 0
        os.kill(pid, signal.SIGKILL)
        gone(pid)
        rows = listed(svc)
        assert (rows["vm1"]["status"], rows["vm1"]["jid"]) == ("Off", 0)
        bls = {r["jname"]: r for r in json.loads(cbsd("bls", "format=json").ok().out)}
        assert {j: r["status"] for j, r in bls.items()} == {
            j: r["status"] for j, r in rows.items()}
        # The kept rows of a stopped VM follow the CLI too: hibernate needs it running.
        cbsd("bstart", "vm2").ok()
        cbsd.console("vm2").wait(COUNTER_RE, count=2)
        assert listed(svc)["vm2"]["status"] == "On"
        cbsd("bsuspend", "vm2").ok()
        assert listed(svc)["vm2"]["status"] == "Suspended"
        cbsd("bremove", "vm2").ok()
        assert sorted(listed(svc)) == ["vm1"]
