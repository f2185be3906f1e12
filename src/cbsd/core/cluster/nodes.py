"""Nodes in etcd: /cbsd/node/NAME (written at join, no lease: what the node offers) and
/cbsd/alive/NAME (under the node's lease, renewed by its keeper every TTL/3 with the free
memory now). A node whose lease lapsed has no alive key: it shows as down. The whole cluster
-- nodes, liveness and every VM's owner record -- is one range read of /cbsd/."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from cbsd.core.cluster.config import PREFIX
from cbsd.core.cluster.store import KV, Put, Reads, Store

NODE = PREFIX + "node/"
ALIVE = PREFIX + "alive/"
VM = PREFIX + "vm/"


def mem_free() -> int:
    """MemAvailable, bytes (what a new VM may take without swapping others out)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def offer(address: str, qemu: str, accel: str) -> dict[str, Any]:
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    return {"address": address, "cpus": os.cpu_count() or 1, "mem_total": total,
            "qemu": qemu, "accel": accel}


def register(store: Store, name: str, record: dict[str, Any]) -> None:
    store.txn([], [Put(NODE + name, json.dumps(record).encode())])


def beat(store: Store, name: str, lease: int) -> None:
    alive = {"mem_free": mem_free(), "pid": os.getpid(), "time": time.time()}
    store.txn([], [Put(ALIVE + name, json.dumps(alive).encode(), lease)])


@dataclass
class Snapshot:
    """The cluster as one range read saw it."""
    nodes: dict[str, dict[str, Any]]
    alive: dict[str, dict[str, Any]]
    vms: dict[str, KV]

    def up(self, node: str) -> bool:
        return node in self.alive

    def free(self, node: str) -> int:
        """What a node has left for a new VM: its free memory now, less what its VMs that
        are not running may take when they start (their vm_ram)."""
        taken = sum(int(kv.json().get("ram", 0)) for kv in self.vms.values()
                    if kv.json().get("node") == node and kv.json().get("status") == "Off")
        return int(self.alive.get(node, {}).get("mem_free", 0)) - taken


def snapshot(store: Reads) -> Snapshot:
    nodes: dict[str, dict[str, Any]] = {}
    alive: dict[str, dict[str, Any]] = {}
    vms: dict[str, KV] = {}
    for kv in store.prefix(PREFIX):
        for prefix, into in ((NODE, nodes), (ALIVE, alive)):
            if kv.key.startswith(prefix):
                into[kv.key[len(prefix):]] = kv.json()
        if kv.key.startswith(VM):
            vms[kv.key[len(VM):]] = kv
    return Snapshot(nodes, alive, vms)


def status_rows(snap: Snapshot) -> list[dict[str, Any]]:
    rows = []
    for name, rec in sorted(snap.nodes.items()):
        owned = sum(1 for kv in snap.vms.values() if kv.json().get("node") == name)
        rows.append({"node": name, "state": "up" if snap.up(name) else "down",
                     "address": rec.get("address"), "cpus": rec.get("cpus"),
                     "mem_total": rec.get("mem_total"),
                     "mem_free": snap.alive.get(name, {}).get("mem_free"),
                     "qemu": rec.get("qemu"), "accel": rec.get("accel"), "vms": owned})
    return rows


def pick(snap: Snapshot, ram: int) -> str | None:
    """bcreate node=auto: the live node with the most free memory that fits *ram*."""
    fits = [(snap.free(n), n) for n in snap.nodes if snap.up(n) and snap.free(n) >= ram]
    return max(fits)[1] if fits else None
