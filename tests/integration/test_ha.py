"""Fencing and failover (docs/cluster.md "Fencing and failover") on three hosts
(tests/guests/cluster.py: each its own etcd member, keeper, sshd and workdir), formed through
the CLI with a short lease. An HA counter guest with a replica on its standby; then:

- a partition: the owner's links go down, everything on it still running. Its keeper kills
  the guest's QEMU while etcd (seen from the standby) still holds the owner's alive key --
  before the lease lapses; the standby then resumes the guest from the replica (no reboot,
  its counter going on from the replicated count, disk matching memory); the two consoles
  never advance at once; healed, the old owner does not start its copy again (refused: the
  record names the standby) and may only remove it.
- a host death: every process of the owner killed and its links down: the standby resumes
  the guest within the lease plus the margins.

The tests go on from each other's state, in file order. Measured over many trials by
bench/bench_ha.py (docs/benchmarks/ha)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guests import cluster, ha
from tests.guests.hosts import Host
from tests.vmchecks import counting, last_count

pytestmark = [pytest.mark.cluster, pytest.mark.vm]
TTL = 6  # the lease: the owner fences at most 4 s after its last renewal (margin 2 s)


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Host]]:
    base = tmp_path_factory.mktemp("ha")
    switch, made = cluster.make(base / "hosts")
    try:
        cluster.form(made, base, TTL)
        yield made
    finally:
        cluster.remove(switch, made)


def up(observer: Host, node: str) -> bool:
    return ha.etcd_get(observer, f"/cbsd/alive/{node}") is not None


def test_a_partitioned_owner_fences_before_its_lease_lapses_and_the_standby_resumes(  # type: ignore[no-untyped-def]
        three: list[Host], counter_image) -> None:
    a, b, c = three
    a.cbsd("bcreate", "jname=vmh", f"image={counter_image()}", "vm_os_type=other",
           "vm_ram=32m").ok()
    a.cbsd("bstart", "vmh").ok()
    ha.arm(a, b, "vmh")
    at = ha.replicate(a, "vmh")
    assert ha.record(c, "vmh")["ha"] == {"node": "b", "interval": 5}
    with ha.Consoles([(a, "vmh"), (b, "vmh")]) as consoles:
        a.link(False)  # cut off; a's processes keep running
        last = last_count(a.cbsd, "vmh")
        # Watch from c's etcd: a's QEMU must be gone while a's alive key is still there.
        killed_while_leased = False
        deadline = time.monotonic() + TTL * 5
        while up(c, "a"):
            if not ha.qemu_running(a, "vmh"):
                killed_while_leased = up(c, "a") or killed_while_leased
            assert time.monotonic() < deadline, "a's lease never lapsed"
        assert not ha.qemu_running(a, "vmh")
        assert killed_while_leased, "a's QEMU was not killed before its lease lapsed"
        first, _ = ha.first_count(b, "vmh", timeout=TTL * 10)
        # from the replica (no reboot): the one shipped just before the cut, or a newer one
        # the keeper's periodic replication published; never past what a printed
        assert at[0] <= first <= last + 1, (first, at, last)
        rec = ha.record(c, "vmh")
        assert rec["node"] == "b" and rec["taken_from"] == "a" and "takeover" not in rec
        a.link(True)
        cluster.wait_for("a up again", lambda: up(c, "a"), timeout=TTL * 10)
        # healed: a's copy stays stopped; the guard refuses to start it there
        ha.not_busy(a, "bstart", "vmh").fails(1, "vmh: owned by node b")
        counting(b.cbsd, "vmh")  # b's copy runs on
    assert consoles.overlaps() == 0 and consoles.both_running == 0, consoles.grew
    assert not ha.qemu_running(a, "vmh") and ha.qemu_running(b, "vmh")
    assert "fenced vmh" in (a.cbsd.workdir / "cluster" / "keeper.log").read_text()
    # the operator removes the old copy (the one change the guard lets run there)
    ha.not_busy(a, "bremove", "vmh").ok()
    assert ha.record(c, "vmh")["node"] == "b"


def test_a_dead_owner_s_guest_resumes_on_its_standby(three: list[Host]) -> None:
    _a, b, c = three
    ha.arm(b, c, "vmh")  # b runs it now (taken over above); c stands by
    at = ha.replicate(b, "vmh")
    last = last_count(b.cbsd, "vmh")
    dead = ha.die(b)
    first, seen = ha.first_count(c, "vmh", timeout=TTL * 10)
    assert at[0] <= first <= last + 1, (first, at, last)
    assert ha.record(c, "vmh")["node"] == "c"
    # the lease, the standby's margin and one read a second, then the promote and restore:
    # bounded, not a figure (bench/bench_ha.py measures it)
    assert seen - dead < TTL + 30, seen - dead


def test_the_watchdog_is_opt_in_and_petted_by_the_keeper(three: list[Host],
                                                         tmp_path: Path) -> None:
    a, _b, c = three
    a.cbsd("bcluster", "mode=start", f"watchdog={tmp_path / 'none-here'}").fails(
        2, "no such device")
    # a regular file stands in for /dev/watchdog: a real one would reboot this machine
    device = tmp_path / "watchdog"
    device.write_bytes(b"")
    a.cbsd("bcluster", "mode=start", f"watchdog={device}").fails(2, "not a character device")
    # the test-only switch lets it pass (bcluster, and the keeper it starts, see it)
    a.cbsd.env["CBSD_TEST_WATCHDOG"] = "1"
    a.cbsd("bcluster", "mode=start", f"watchdog={device}").ok()
    cluster.wait_for("petted", lambda: device.stat().st_size >= 5, timeout=TTL * 5)
    assert set(device.read_bytes()) == {0}
    assert up(c, "a")
    a.cbsd("bcluster", "mode=start", "watchdog=none").ok()  # the keeper anew, without it
    assert device.read_bytes().endswith(b"V")  # disarmed by the magic close
    size = device.stat().st_size
    cluster.wait_for("a up", lambda: up(c, "a"), timeout=TTL * 5)
    assert device.stat().st_size == size
