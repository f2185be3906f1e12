"""`cbsd serve` on a cluster node changes VMs through the same ownership guard as the CLI
(docs/cluster.md, "The service on a cluster node"): a VM another node owns is refused through
the API -- 409, with the message the CLI prints -- and one this node owns is changed, its owner
record written by the guard as the CLI's commands write it.

The smallest set-up that shows it: two hosts of tests/guests/cluster.py (the third stays out),
each with a VM named `shared` from before the cluster; a's init claims it, so b's copy is owned
by a. b also has `mine`, which b's join claims. b's service is asked about both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guests import cluster
from tests.guests.hosts import Host
from tests.service import Service

pytestmark = [pytest.mark.cluster, pytest.mark.vm]
T0 = 1_796_536_810.0  # 2026-12-06 06:00:10 UTC, the service's clock at its start


@pytest.fixture(scope="module")
def b_serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Service]]:
    base = tmp_path_factory.mktemp("apicluster")
    switch, made = cluster.make(base / "hosts")
    try:
        a, b, _ = made
        for h in (a, b):
            h.cbsd("bcreate", "shared", "imgsize=16m", "vm_ram=64m").ok()
        b.cbsd("bcreate", "mine", "imgsize=16m", "vm_ram=64m").ok()
        # Both of b's VMs scheduled (before the cluster: afterwards b may not change shared);
        # b's service ticks by the test's clock (cbsd/clock.py), moved by the schedule test.
        clock = base / "clock"
        clock.write_text(repr(T0))
        b.cbsd.env.update({"CBSD_TEST_CLOCK": str(clock), "TZ": "UTC"})  # bset arms at T0
        for jname in ("shared", "mine"):
            b.cbsd("bset", jname, "checkpoint_schedule=@hourly", "checkpoint_stopped=1").ok()
        cluster.form([a, b], base)
        a.cbsd("bcreate", "onlya", "imgsize=16m", "vm_ram=64m").ok()  # a's name, not on b
        with Service(b.cbsd.workdir, prefix=b.ns.prefix,
                     env={"CBSD_TEST_CLOCK": str(clock), "TZ": "UTC"}) as svc:
            yield b, svc
    finally:
        cluster.remove(switch, made)


def cli_refusal(h: Host, *args: str) -> str:
    """The line the CLI prints when it refuses `cbsd ARGS` on *h* (another node owns it)."""
    return h.cbsd(*args).fails(1, "owned by node a in the cluster").err.strip()


def test_changes_to_a_vm_another_node_owns_are_refused_with_the_clis_message(
        b_serving: tuple[Host, Service]) -> None:
    b, svc = b_serving
    before = cluster.record(b, "shared")
    assert before["node"] == "a"
    # a synchronous change (bset's keys)
    r = svc.client.patch("/1.0/instances/shared/config", json={"vm_cpus": 2})
    assert r.status_code == 409, r.text
    assert r.json() == {"error": cli_refusal(b, "bset", "shared", "vm_cpus=2"),
                        "error_code": 409}
    assert "bset refused" in r.json()["error"]
    r = svc.client.post("/1.0/instances/shared/disks", json={"dsk_size": "16m"})
    assert (r.status_code, r.json()["error"]) == (409, cli_refusal(
        b, "bhyve-dsk", "mode=attach", "jname=shared", "dsk_size=16m"))
    # the operations: refused before they start, with their CLI command's message
    for method, path, body, args in (
            ("PUT", "/1.0/instances/shared/state", {"action": "start"}, ("bstart", "shared")),
            ("DELETE", "/1.0/instances/shared", None, ("bremove", "shared")),
            ("POST", "/1.0/instances/shared/checkpoints", {"name": "c1"},
             ("bcheckpoint", "mode=create", "jname=shared", "name=c1")),
            # a name another node owns is not created here either
            ("POST", "/1.0/instances", {"jname": "onlya", "imgsize": "16m"},
             ("bcreate", "onlya", "imgsize=16m"))):
        r = svc.client.request(method, path, json=body)
        assert r.status_code == 409, (path, r.text)
        assert r.json()["error"] == cli_refusal(b, *args), path
    # nothing was changed here, nor in the record
    spec = svc.client.get("/1.0/instances/shared").json()
    assert spec["config"]["vm_cpus"] == 1 and spec["status"] == "Off"
    assert svc.client.get("/1.0/operations").json() == []
    assert cluster.record(b, "shared") == before
    assert [r["jname"] for r in svc.client.get("/1.0/instances").json()] == ["mine", "shared"]


def test_a_vm_this_node_owns_is_changed_through_the_guard(
        b_serving: tuple[Host, Service]) -> None:
    b, svc = b_serving
    r = svc.client.patch("/1.0/instances/mine/config", json={"vm_cpus": 2})
    assert r.status_code == 200, r.text
    rec = cluster.record(b, "mine")
    # written by the guard in the request's Context: the command and the VM's facts after it
    assert (rec["node"], rec["last"], rec["cpus"]) == ("b", "bset", 2)
    # an operation (its own Context in its own thread) runs in the guard too
    svc.ok(svc.client.put("/1.0/instances/mine/state", json={"action": "start"}))
    rec = cluster.record(b, "mine")
    assert (rec["node"], rec["last"], rec["status"]) == ("b", "bstart", "On")
    svc.ok(svc.client.put("/1.0/instances/mine/state",
                          json={"action": "stop", "noacpi": True}))
    rec = cluster.record(b, "mine")
    assert (rec["last"], rec["status"]) == ("bstop", "Off")


def test_a_schedule_tick_runs_in_the_guard_too(b_serving: tuple[Host, Service]) -> None:
    """The service's scheduler (its own Context, each tick) takes mine's checkpoint through
    the guard and is refused shared's, as `cbsd bschedule` would be."""
    b, svc = b_serving
    clock = Path(svc.env["CBSD_TEST_CLOCK"])
    tmp = clock.with_name(".clock.tmp")
    tmp.write_text(repr(T0 + 3600))
    tmp.rename(clock)  # atomically: the service reads it at any moment
    refused = "shared: owned by node a in the cluster, not by this node (b): bschedule refused"
    cluster.wait_for("shared's refusal", lambda: refused in svc.log_text())
    cluster.wait_for("mine's checkpoint", lambda: "mine: scheduled checkpoint" in
                     svc.log_text())
    assert [c["name"] for c in b.cbsd.checkpoints("shared")] == []
    assert [c["name"] for c in b.cbsd.checkpoints("mine")] == ["auto-20261206-0700"]
    assert cluster.record(b, "mine")["last"] == "bschedule"
    assert cluster.record(b, "shared")["node"] == "a"
