"""Nodes, leases and the one-read view of the cluster (core/cluster/nodes.py, keeper.py)."""

from __future__ import annotations

import json

from cbsd.core.cluster import keeper, nodes
from cbsd.core.cluster.store import Put
from tests.unit.core.cluster.fakestore import FakeStore

GIB = 1 << 30


def _node(s: FakeStore, name: str, free: int, ttl: int = 10) -> int:
    nodes.register(s, name, {"address": f"10.0.0.{len(name)}", "cpus": 2, "mem_total": 8 * GIB,
                             "qemu": "7.2.22", "accel": "kvm"})
    lease = s.grant(ttl)
    s.txn([], [Put(nodes.ALIVE + name, json.dumps({"mem_free": free}).encode(), lease)])
    return lease


def test_a_node_whose_lease_lapses_shows_down_and_its_keeper_keeps_it_up() -> None:
    s = FakeStore()
    nodes.register(s, "a", {"address": "10.0.0.9"})
    keeper.run(s, "a", ttl=10, rounds=1, sleep=0)
    _node(s, "b", 4 * GIB)
    assert [r["state"] for r in nodes.status_rows(nodes.snapshot(s))] == ["up", "up"]
    s.now += 5
    keeper.run(s, "a", ttl=10, rounds=1, sleep=0)  # a's keeper renews (a new lease, here)
    s.now += 6  # b's lease was granted 11 s ago and never renewed
    rows = {r["node"]: r for r in nodes.status_rows(nodes.snapshot(s))}
    assert rows["a"]["state"] == "up" and rows["b"]["state"] == "down"
    assert rows["b"]["address"] == "10.0.0.1" and rows["b"]["mem_free"] is None


def test_a_keeper_cut_off_longer_than_its_lease_registers_again() -> None:
    s = FakeStore()
    keeper.run(s, "a", ttl=3, rounds=1, sleep=0)
    s.down = True
    keeper.run(s, "a", ttl=3, rounds=2, sleep=0)  # no exception: it tries again
    s.down, s.now = False, s.now + 10
    assert not nodes.snapshot(s).up("a")
    keeper.run(s, "a", ttl=3, rounds=1, sleep=0)
    assert nodes.snapshot(s).up("a")


def test_the_whole_cluster_is_one_read() -> None:
    s = FakeStore()
    _node(s, "a", 4 * GIB)
    for i in range(1000):
        s.txn([], [Put(nodes.VM + f"vm{i}", json.dumps({"node": "abc"[i % 3]}).encode())])
    s.reads = 0
    snap = nodes.snapshot(s)
    assert s.reads == 1 and len(snap.vms) == 1000


def test_auto_picks_the_live_node_with_most_free_memory_for_the_vm() -> None:
    s = FakeStore()
    _node(s, "a", 2 * GIB)
    _node(s, "b", 6 * GIB)
    _node(s, "c", 9 * GIB, ttl=1)
    s.now += 2  # c is down: never picked, however much it had
    assert nodes.pick(nodes.snapshot(s), GIB) == "b"
    # b's stopped VMs will take their RAM when they start: counted as taken
    s.txn([], [Put(nodes.VM + "big", json.dumps({"node": "b", "ram": 5 * GIB,
                                                  "status": "Off"}).encode())])
    assert nodes.pick(nodes.snapshot(s), GIB) == "a"
    assert nodes.pick(nodes.snapshot(s), 3 * GIB) is None
