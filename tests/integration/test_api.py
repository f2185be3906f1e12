"""The service's REST API (docs/api.md) against a real `cbsd serve` and real VMs (the
boot-sector counter guest): what the API does is judged by what the guest shows."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.guests import build
from tests.harness import COUNTER_RE, Cbsd, counter_lines
from tests.service import Service
from tests.vmchecks import counting, first_after

pytestmark = pytest.mark.vm


class Events:
    """GET /1.0/events read in a thread: every event, in order."""

    def __init__(self, svc: Service) -> None:
        self.seen: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self.cond = threading.Condition()
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(svc.socket)),
                                   base_url="http://cbsd", timeout=None)
        threading.Thread(target=self._read, daemon=True).start()
        assert self.ready.wait(30)

    def _read(self) -> None:
        # the stream ends with the service (an HTTP error then is the end, not a failure)
        with contextlib.suppress(httpx.HTTPError), self.client.stream("GET", "/1.0/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                self.ready.set()
                if line.startswith("data: "):
                    with self.cond:
                        self.seen.append(json.loads(line[6:]))
                        self.cond.notify_all()

    def wait_for(self, match: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.seen if all(
                e["metadata"].get(k) == v if k != "type" else e["type"] == v
                for k, v in match.items())), None)
        with self.cond:
            assert self.cond.wait_for(found, timeout), (match, self.seen)
            hit = found()
            assert hit is not None
            return hit


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    (tmp_path / "pool").mkdir()
    build.counter_image(tmp_path / "pool" / "counter.raw")
    return tmp_path / "pool"


@pytest.fixture
def service(cbsd: Cbsd, pool: Path) -> Iterator[Service]:
    with Service(cbsd.workdir, f"pools={pool}") as svc:
        yield svc


def state(svc: Service, jname: str, action: str, **keys: Any) -> dict[str, Any]:
    return svc.ok(svc.client.put(f"/1.0/instances/{jname}/state",
                                 json={"action": action, **keys}))


def status(svc: Service, jname: str) -> str:
    return str(svc.client.get(f"/1.0/instances/{jname}").json()["status"])


def test_a_vm_through_the_api(service: Service, cbsd: Cbsd, pool: Path) -> None:
    """Create, start, checkpoint, restore (the counter goes on from the checkpoint), pause,
    verify, destroy, stop -- every step through the API, each reported on the event stream."""
    svc = service
    events = Events(svc)
    svc.ok(svc.client.post("/1.0/instances", json={
        "jname": "vm1", "image": str(pool / "counter.raw"), "vm_os_type": "other",
        "vm_ram": "32m"}))
    listed = svc.client.get("/1.0/instances").json()
    assert [r.pop("checkpoints") for r in listed] == [0]
    assert json.loads(cbsd("bls", "format=json").ok().out) == listed  # the same facts as bls
    state(svc, "vm1", "start")
    events.wait_for({"type": "lifecycle", "name": "vm1", "status": "On"})
    before = counting(cbsd, "vm1")
    op = svc.ok(svc.client.post("/1.0/instances/vm1/checkpoints", json={"name": "cp1"}))
    assert op["result"].startswith("Checkpoint was created!")
    events.wait_for({"type": "operation", "id": op["id"], "status": "Success"})
    after = counting(cbsd, "vm1", 1)
    svc.ok(svc.client.post("/1.0/instances/vm1/checkpoints", json={"name": "cp2"}))
    assert svc.client.get("/1.0/instances").json()[0]["checkpoints"] == 2
    tree = svc.client.get("/1.0/instances/vm1/checkpoints").json()
    by_name = {ck["name"]: ck for ck in tree["checkpoints"]}
    assert (by_name["cp1"]["parent"], by_name["cp1"]["children"]) == (None, ["cp2"])
    assert (by_name["cp2"]["parent"], tree["current"], tree["roots"]) == ("cp1", "cp2", ["cp1"])
    assert by_name["cp1"]["size"] > 0 and by_name["cp1"]["created"]

    state(svc, "vm1", "stop", noacpi=True)  # a restore needs it stopped, as bstart's
    con = cbsd.console("vm1")
    mark = con.mark()
    svc.ok(svc.client.post("/1.0/instances/vm1/checkpoints/cp1/restore"))
    first = first_after(cbsd, "vm1", mark)
    assert before <= first <= after + 1, (before, first, after)  # on from cp1's instant
    assert "BOOT" not in con.since(mark)

    state(svc, "vm1", "pause")
    assert status(svc, "vm1") == "Paused"
    events.wait_for({"type": "lifecycle", "name": "vm1", "status": "Paused"})
    state(svc, "vm1", "resume")
    counting(cbsd, "vm1")
    verdict = svc.ok(svc.client.post("/1.0/instances/vm1/checkpoints/cp1/verify"))["result"]
    assert verdict == {"checkpoint": "cp1", "ok": True, "problem": None}
    svc.ok(svc.client.delete("/1.0/instances/vm1/checkpoints/cp2"))
    assert [ck["name"] for ck in svc.client.get(
        "/1.0/instances/vm1/checkpoints").json()["checkpoints"]] == ["cp1"]
    r = svc.client.delete("/1.0/instances/vm1/checkpoints/cp2")
    assert (r.status_code, r.json()["error"]) == (404, "vm1: no checkpoint cp2")
    state(svc, "vm1", "stop", noacpi=True)
    assert status(svc, "vm1") == "Off"


def test_busy_vm_is_409_and_an_operation_cancels_alone(service: Service, cbsd: Cbsd,
                                                      running_counter: str) -> None:
    """While the service stops a VM (the counter guest ignores the ACPI button, so the stop
    waits), any other change of it is 409 -- through the API and through the CLI, which share
    its lock -- and cancelling that operation leaves the VM running, others untouched."""
    svc = service
    stopping = svc.client.put("/1.0/instances/vm1/state",
                              json={"action": "stop", "hard_timeout": 600})
    assert stopping.status_code == 202
    for r in (svc.client.put("/1.0/instances/vm1/state", json={"action": "pause"}),
              svc.client.post("/1.0/instances/vm1/checkpoints", json={"name": "x"})):
        assert r.status_code == 409, r.text
        assert r.json()["error_code"] == 409 and "vm1: busy" in r.json()["error"]
    cbsd("bpause", "vm1", "mode=on").fails(75, "vm1: busy")
    op = svc.client.delete(f"/1.0/operations/{stopping.json()['id']}").json()
    final = svc.wait(stopping, timeout=120)  # (the stop would wait 600 s)
    assert (final["status"], final["err"]) == ("Cancelled", "cancelled through the API"), op
    counting(cbsd, "vm1")  # still running, still counting
    assert status(svc, "vm1") == "On"
    state(svc, "vm1", "stop", noacpi=True)


def test_kill_9_of_the_service_leaves_the_vm_running(service: Service, cbsd: Cbsd,
                                                     counter_vm: str) -> None:
    """kill -9 of the service, even in the middle of an operation on the VM, neither stops
    nor pauses the VM; the next service (or CLI command) carries on with it. A SIGTERM stop
    of the service leaves it running as well."""
    svc = service
    state(svc, "vm1", "start")
    counting(cbsd, "vm1")
    r = svc.client.put("/1.0/instances/vm1/state", json={"action": "stop", "hard_timeout": 600})
    assert r.status_code == 202
    svc.kill()  # SIGKILL, while the operation holds the VM's lock
    seen = counting(cbsd, "vm1")
    assert counting(cbsd, "vm1") > seen  # QEMU lives on: it was never the service's child
    with Service(cbsd.workdir) as again:
        assert status(again, "vm1") == "On"
        r = again.client.get(f"/1.0/operations/{r.json()['id']}")
        assert r.status_code == 404 and "forgotten" in r.json()["error"]
        state(again, "vm1", "pause")  # the dead holder's lock is recovered
        state(again, "vm1", "resume")
        r = again.client.put("/1.0/instances/vm1/state",
                             json={"action": "stop", "hard_timeout": 600})
        assert r.status_code == 202
    # A plain stop (SIGTERM, as systemctl stop/restart) leaves it running too: the operation
    # it was running is cancelled and rolls back, as a CLI command's on SIGTERM.
    assert again.proc is not None and again.proc.returncode == 0, again.log_text()
    assert (cbsd.workdir / "var" / "lock" / "vm1.lock").read_text() == ""  # released
    seen = counting(cbsd, "vm1")
    assert counting(cbsd, "vm1") > seen
    with Service(cbsd.workdir) as third:
        state(third, "vm1", "stop", noacpi=True)
        assert status(third, "vm1") == "Off"
    lines = counter_lines(cbsd.console("vm1").text())
    assert all(ok == "OK" for _, _, ok in lines)


def test_errors_carry_the_cli_message(service: Service, cbsd: Cbsd, counter_vm: str) -> None:
    r = service.client.get("/1.0/instances/nope")
    assert r.json() == {"error": "No such VM: nope", "error_code": 404}
    r = service.client.patch("/1.0/instances/vm1/config", json={"vm_cpus": 0})
    assert r.status_code == 400
    assert r.json()["error"] == cbsd("bset", "vm1", "vm_cpus=0").fails(2, "vm_cpus").err.strip()
    r = service.client.put("/1.0/instances/vm1/state", json={"action": "fly"})
    assert r.status_code == 400 and r.json()["error"].startswith("PUT /1.0/instances/vm1/state")
    ok = service.client.patch("/1.0/instances/vm1/config", json={"vm_cpus": 2})
    assert ok.status_code == 200 and ok.json()["config"]["vm_cpus"] == 2
    assert json.loads(cbsd("bget", "vm1", "format=json").ok().out)["vm_cpus"] == 2


def test_hibernate_disks_and_clone(service: Service, cbsd: Cbsd, running_counter: str) -> None:
    """Hibernate and resume (the counter goes on), a disk attached and detached, a clone with
    a checkpoint that continues from its instant, a restart that boots afresh."""
    svc = service
    seen = counting(cbsd, "vm1")
    state(svc, "vm1", "hibernate")
    assert status(svc, "vm1") == "Suspended"
    con = cbsd.console("vm1")
    mark = con.mark()
    state(svc, "vm1", "start")
    assert first_after(cbsd, "vm1", mark) >= seen and "BOOT" not in con.since(mark)
    svc.ok(svc.client.post("/1.0/instances/vm1/checkpoints", json={"name": "cp"}))
    state(svc, "vm1", "stop", noacpi=True)

    r = svc.client.post("/1.0/instances/vm1/disks", json={"dsk_size": "16m"})
    assert r.status_code == 201, r.text
    assert [d["dsk_name"] for d in r.json()["disks"]][-1] == "dsk2"
    r = svc.client.delete("/1.0/instances/vm1/disks/dsk2")
    assert r.status_code == 200 and "dsk2" not in [d["dsk_name"] for d in r.json()["disks"]]
    assert svc.client.post("/1.0/instances/vm1/disks", json={"dsk_size": "0"}).status_code \
        == 400

    svc.ok(svc.client.post("/1.0/instances/vm1/clone", json={"new": "vm2", "checkpoint": "cp"}))
    assert [r["jname"] for r in svc.client.get("/1.0/instances").json()] == ["vm1", "vm2"]
    r = svc.client.post("/1.0/instances/vm1/clone", json={"new": "vm2"})
    assert svc.wait(r)["err"] == "VM already exist: vm2"
    con2 = cbsd.console("vm2")
    mark = con2.mark()
    svc.ok(svc.client.post("/1.0/instances/vm2/checkpoints/cp/restore"))
    assert first_after(cbsd, "vm2", mark) >= seen and "BOOT" not in con2.since(mark)
    mark = con2.mark()
    state(svc, "vm2", "restart", noacpi=True)
    con2.wait(COUNTER_RE, since=mark, count=2)
    assert "BOOT" in con2.since(mark)  # a restart boots the guest afresh
    state(svc, "vm2", "stop", noacpi=True)
    svc.ok(svc.client.delete("/1.0/instances/vm2"))
    assert [r["jname"] for r in svc.client.get("/1.0/instances").json()] == ["vm1"]
