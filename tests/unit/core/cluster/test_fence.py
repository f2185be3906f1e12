"""Self-fencing and the watchdog (core/cluster/fence.py, keeper.py, watchdog.py): the decisions
as tables, then the keeper's rounds against the in-memory store on a clock the test moves,
with VMs whose QEMU is the fake one (a real process that SIGKILL ends)."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cbsd.core.cluster import fence, keeper, nodes
from cbsd.core.cluster import watchdog as wdog
from cbsd.core.cluster.keeper import Keeper
from cbsd.core.cluster.store import Put
from cbsd.core.cluster.watchdog import Watchdog
from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from tests.unit.core.cluster.fakestore import FakeStore
from tests.unit.core.conftest import define

HA = {"node": "b", "interval": 30}


@pytest.mark.parametrize(("ttl", "last_ok", "now", "margin", "due"), [
    (10, 100.0, 100.0, 2.0, False),    # just renewed
    (10, 100.0, 103.4, 2.0, False),    # one renewal period late: never fences
    (10, 100.0, 107.9, 2.0, False),    # two periods late, still inside ttl - margin
    (10, 100.0, 108.0, 2.0, True),     # ttl - margin: the lease may lapse within the margin
    (10, 100.0, 130.0, 2.0, True),     # long cut off
    (3, 50.0, 51.9, 1.0, False),
    (3, 50.0, 52.0, 1.0, True),
])
def test_fencing_is_due_at_ttl_less_the_margin_after_the_last_renewal(
        ttl: int, last_ok: float, now: float, margin: float, due: bool) -> None:
    assert fence.fence_due(ttl, last_ok, now, margin) is due


@pytest.mark.parametrize(("ttl", "margin"), [(2, 2 / 3), (3, 1.0), (6, 2.0), (10, 2.0),
                                             (60, 2.0)])
def test_the_margin_is_at_most_a_third_of_the_lease(ttl: int, margin: float) -> None:
    # renewals come every ttl/3: the margin never makes one late renewal fence
    assert fence.margin(ttl) == pytest.approx(margin)
    assert ttl - fence.margin(ttl) >= 2 * ttl / 3


@pytest.mark.parametrize(("first_gone", "now", "due"), [
    (None, 100.0, False), (100.0, 100.0, False), (100.0, 101.9, False), (100.0, 102.0, True)])
def test_the_standby_waits_the_margin_after_seeing_the_owner_gone(
        first_gone: float | None, now: float, due: bool) -> None:
    assert fence.takeover_due(first_gone, now, 2.0) is due


def test_the_fencing_set_is_the_ha_vms_this_node_owns() -> None:
    records = {"v1": {"node": "a", "ha": HA}, "v2": {"node": "a"}, "v3": {"node": "b", "ha": HA},
               "v4": {"node": "a", "ha": None}}
    assert fence.ha_owned(records, "a") == {"v1"}


def test_stale_copies_are_the_vms_here_another_node_provably_took() -> None:
    records = {"taken": {"node": "b", "ha": HA, "taken_from": "a"},
               "defined_ha": {"node": "b", "ha": HA}, "mine": {"node": "a", "ha": HA},
               "plain": {"node": "b"}, "migrating": {"node": "b", "from": "a", "ha": HA},
               "moving": {"node": "b", "ha": HA, "taken_from": "a"},
               "elsewhere": {"node": "c", "ha": HA},
               "promoted": {"node": "b", "ha": None, "taken_from": "a"},
               "other": {"node": "b", "ha": None, "taken_from": "c"},
               "same_name": {"node": "b", "ha": HA}}
    local = ["taken", "defined_ha", "mine", "plain", "migrating", "moving", "unclustered",
             "promoted", "other", "same_name", "elsewhere"]
    # "same_name", "elsewhere": a VM of this name was here before the node joined (never
    # owned here, not defined ha=1 here): another VM, not killed
    assert fence.stale_here(records, "a", local, moving=["moving"],
                            local_ha=["defined_ha", "mine", "migrating"]) == {
        "taken", "defined_ha", "promoted"}


class Clock:
    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def __call__(self) -> float:
        return self.store.now


def bset(ctx: Context, jname: str, **keys: Any) -> None:
    spec = ctx.inventory.get(jname)
    assert spec is not None
    ctx.inventory.update_spec(replace(spec, **keys))


def running(ctx: Context, jname: str) -> VM:
    define(ctx, jname)
    lifecycle.start(ctx, jname)
    vm = VM.load(ctx, jname)
    assert vm.alive()
    return vm


def owned(s: FakeStore, jname: str, node: str, ha: bool = True) -> None:
    rec = {"node": node, **({"ha": HA} if ha else {})}
    s.txn([], [Put(nodes.VM + jname, json.dumps(rec).encode())])


def test_a_node_cut_off_kills_its_ha_vms_before_its_lease_can_expire(ctx: Context) -> None:
    s = FakeStore()
    log: list[str] = []
    k = Keeper(s, "a", 10, lambda: ctx, clock=Clock(s), log=log.append)
    ha_vm, plain = running(ctx, "ha1"), running(ctx, "plain")
    owned(s, "ha1", "a")
    owned(s, "plain", "a", ha=False)
    assert k.renew()
    k.watch()
    assert k.fencing == {"ha1"}
    s.down = True  # etcd out of reach from here on
    for t in (1, 3.4, 6.8, 7.9):  # renewals fail; the lease has not lapsed yet
        s.now = t
        assert not k.renew()
        assert k.tick() and ha_vm.alive()
    s.now = 8.0  # ttl - margin after the last renewal (sent at 0): the lease lapses at >= 10
    assert k.tick()
    assert not ha_vm.alive() and plain.alive()
    assert log == [log[0]] and log[0].startswith("fenced ha1: last renewal 8.00 s ago")
    # still cut off: nothing here starts it again (the guard cannot ask etcd); the keeper
    # kills it anyway if something does
    lifecycle.start(ctx, "ha1")
    s.now = 9.0
    assert k.tick() and not VM.load(ctx, "ha1").alive()
    assert len(log) == 2  # killed again, and said so
    # etcd back, the lease long gone: a new lease, the VM stays stopped
    s.down, s.now = False, 30.0
    assert k.renew()
    assert k.tick() and not VM.load(ctx, "ha1").alive()
    assert nodes.snapshot(s).up("a")


def test_the_lease_is_dated_by_when_the_renewal_was_sent(ctx: Context) -> None:
    # a renewal that took 4 s to answer counts from its start: etcd renewed it no earlier
    s = FakeStore()
    k = Keeper(s, "a", 10, lambda: ctx, clock=Clock(s))
    real = s.keepalive

    def slow(lease: int) -> int:
        ttl = real(lease)
        s.now += 4
        return ttl

    assert k.renew()
    s.now = 3.0
    s.keepalive = slow  # type: ignore[method-assign]
    assert k.renew()
    assert k.last_ok == 3.0 and s.now == 7.0


def test_a_keeper_before_its_first_renewal_counts_as_due(ctx: Context) -> None:
    s = FakeStore()
    s.down = True
    vm = running(ctx, "ha1")
    k = Keeper(s, "a", 10, lambda: ctx, clock=Clock(s))
    k.fencing = {"ha1"}
    assert k.tick() and not vm.alive()


def test_a_keeper_that_never_read_the_cluster_fences_the_vms_defined_ha_here(
        ctx: Context) -> None:
    # restarted while etcd is out of reach: no record read yet, the definitions stand in
    s = FakeStore()
    s.down = True
    ha_vm, plain = running(ctx, "ha1"), running(ctx, "plain")
    bset(ctx, "ha1", ha=True, ha_node="b")
    k = Keeper(s, "a", 10, lambda: ctx, clock=Clock(s))
    assert not k.renew()
    assert k.tick()
    assert not ha_vm.alive() and plain.alive()


def test_a_copy_taken_over_elsewhere_is_killed_here_when_the_node_is_back(ctx: Context) -> None:
    s = FakeStore()
    vm = running(ctx, "ha1")
    bset(ctx, "ha1", ha=True, ha_node="b")
    owned(s, "ha1", "b")  # the standby took it while this node was away
    k = Keeper(s, "a", 10, lambda: ctx, clock=Clock(s))
    assert k.renew()
    k.watch()
    assert not vm.alive()


def test_a_same_name_vm_that_was_here_before_the_node_joined_is_not_killed(
        ctx: Context) -> None:
    # docs/cluster.md: a name another node owns stays unowned here -- another VM, not a copy
    s = FakeStore()
    vm = running(ctx, "web")
    owned(s, "web", "b")  # node b's HA VM of the same name
    k = Keeper(s, "a", 10, lambda: ctx, clock=Clock(s))
    assert k.renew()
    k.watch()
    assert vm.alive()


def test_the_watchdog_is_petted_each_healthy_round_and_not_when_fencing_fails(
        ctx: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    device = tmp_path / "watchdog"  # a regular file stands in: never a real device here
    device.write_bytes(b"")
    monkeypatch.setenv(wdog.TEST_ENV, "1")
    s = FakeStore()
    dog = Watchdog(str(device), 10)
    k = Keeper(s, "a", 10, lambda: ctx, clock=Clock(s), watchdog=dog)
    running(ctx, "ha1")
    owned(s, "ha1", "a")
    assert k.renew()
    k.watch()
    for t in (0.2, 0.4, 0.6):
        s.now = t
        k.tick()
    assert device.read_bytes() == b"\0" * 3
    s.now = 9.0  # cut off, due, and the kill works: still healthy
    assert k.tick()
    assert device.read_bytes() == b"\0" * 4
    lifecycle.start(ctx, "ha1")
    # a QEMU that will not die
    monkeypatch.setattr(fence.process, "wait_gone", lambda *_a, **_k: False)
    assert not k.tick()
    assert device.read_bytes() == b"\0" * 4  # no pet: the kernel reboots the host
    dog.disarm()
    assert device.read_bytes() == b"\0" * 4 + b"V"


def test_fencing_kills_every_qemu_before_waiting_for_any(
        ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    # one QEMU stuck in the kernel (its wait times out) must not hold up the others' SIGKILL
    vms = {j: running(ctx, j) for j in ("ha1", "ha2", "ha3")}
    events: list[str] = []
    real_kill, real_wait = fence.process.kill, fence.process.wait_gone

    def kill(pid: int, marker: str, sig: int) -> None:
        events.append("kill")
        real_kill(pid, marker, sig)

    def wait(pid: int, marker: str, timeout: float, **kw: bool) -> bool:
        events.append("wait")
        return False if pid == vms["ha1"].pid else real_wait(pid, marker, timeout, **kw)

    monkeypatch.setattr(fence.process, "kill", kill)
    monkeypatch.setattr(fence.process, "wait_gone", wait)
    killed, left = fence.kill_all(ctx, vms)
    assert events == ["kill"] * 3 + ["wait"] * 3
    assert killed == ["ha2", "ha3"] and left == ["ha1"]


def test_the_keeper_pets_only_a_character_device_unless_the_test_switch_is_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "disk"  # what watchdog=/dev/sda would be: never written to
    disk.write_bytes(b"data")
    monkeypatch.delenv(wdog.TEST_ENV, raising=False)
    with pytest.raises(wdog.WatchdogError, match="not a character device"):
        Watchdog(str(disk), 10)
    assert disk.read_bytes() == b"data"
    monkeypatch.setenv(wdog.TEST_ENV, "1")
    Watchdog(str(disk), 10).pet()
    assert disk.read_bytes() == b"\0ata"


@pytest.mark.parametrize(("ttl", "last_ok", "now", "timeout", "safe"), [
    (10, 100.0, 100.2, 1, True),
    (10, 100.0, 103.4, 1, True),     # one renewal round late
    (10, 100.0, 106.9, 1, True),     # a reboot at 107.9: before fencing is due (108)
    (10, 100.0, 107.0, 1, False),    # a reboot at 108 would come with the lease's last margin
    (10, 100.0, 107.5, 0, True),     # no watchdog: only fencing's own deadline
    (60, 100.0, 120.0, 18, True),
    (60, 100.0, 140.0, 18, False),   # ttl 60, a 60 s timeout would never be safe
    (60, 100.0, 100.0, 60, False),
])
def test_the_watchdog_is_petted_only_if_a_reboot_a_timeout_later_beats_fencing(
        ttl: int, last_ok: float, now: float, timeout: int, safe: bool) -> None:
    assert fence.pet_safe(ttl, last_ok, now, timeout, fence.margin(ttl)) is safe


@pytest.mark.parametrize(("ttl", "wanted", "fits"), [
    # (ttl, the timeout asked, the timeouts a driver may give that still protect)
    (3, 1, ()), (6, 1, (1,)), (9, 1, (1, 2, 3)), (10, 1, (1, 2, 3, 4)),
    (30, 8, tuple(range(1, 18))), (60, 18, tuple(range(1, 38))),
])
def test_the_watchdog_timeout_asked_and_the_ones_accepted(
        ttl: int, wanted: int, fits: tuple[int, ...]) -> None:
    m = fence.margin(ttl)
    assert wdog.wanted_timeout(ttl, m) == wanted
    assert tuple(t for t in range(0, 200) if wdog.protects(ttl, m, t)) == fits


class Dog:
    """A watchdog that records when it was petted and whether the HA VM *vm* still ran."""

    def __init__(self, clock: Clock, timeout: int, vm: VM) -> None:
        self.clock, self.timeout, self.vm = clock, timeout, vm
        self.pets: list[tuple[float, bool]] = []

    def pet(self) -> None:
        self.pets.append((self.clock(), self.vm.alive()))


def test_a_hung_keeper_is_rebooted_before_its_lease_can_expire(ctx: Context) -> None:
    # the keeper may hang right after any pet: while an HA VM runs here, the reboot (a
    # timeout later) must come before the lease can lapse -- here cut off after a renewal at 0
    s = FakeStore()
    ttl = 10
    vm = running(ctx, "ha1")
    dog = Dog(Clock(s), 1, vm)  # 1 s: what the keeper asks for a 10 s lease (wanted_timeout)
    k = Keeper(s, "a", ttl, lambda: ctx, clock=Clock(s), watchdog=dog)  # type: ignore[arg-type]
    owned(s, "ha1", "a")
    assert k.renew()
    k.watch()
    s.down = True
    t = 0.0
    while t < 9.0:
        s.now = t
        k.tick()
        t = round(t + 0.1, 1)
    assert all(p + dog.timeout < k.last_ok + ttl - k.margin for p, ran in dog.pets if ran), \
        dog.pets
    assert not vm.alive()
    # the keeper fenced rather than stop petting: the host is not rebooted
    assert [p for p, _ in dog.pets] == [round(i * 0.1, 1) for i in range(90)]


def test_a_driver_whose_timeout_cannot_protect_the_lease_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # /dev/null: a character device that takes the writes; its "driver" is the fake ioctl
    told = {"timeout": 60}  # a driver with a fixed 60 s timeout

    def ioctl(_fd: int, req: int, arg: bytes) -> bytes:
        if req == wdog.WDIOC_GETTIMEOUT:
            return struct.pack("i", told["timeout"])
        return arg

    monkeypatch.setattr(wdog.fcntl, "ioctl", ioctl)
    with pytest.raises(OSError, match="cannot protect a 10 s lease"):
        Watchdog("/dev/null", 10)
    told["timeout"] = 1  # took the 1 s asked
    dog = Watchdog("/dev/null", 10)
    assert dog.timeout == 1
    dog.disarm()


def test_run_keeps_the_lease_of_a_keeper_without_vms() -> None:
    s = FakeStore()
    keeper.run(s, "a", ttl=3, rounds=2, sleep=0)
    assert nodes.snapshot(s).up("a")
