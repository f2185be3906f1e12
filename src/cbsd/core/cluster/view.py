"""The cluster as one range read, for the commands that only look: `bls node='*'`, `bwhereis`,
`bcluster mode=status` and `bcreate node=auto`. They read through gateway.Reader (the standard
library's HTTPS, no etcd3gw) and import nothing of admin's (members, PKI, the keeper), so a
listing of the whole cluster costs one TLS round trip and the parsing of its answer."""

from __future__ import annotations

from typing import Any

from cbsd.core.cluster import config, nodes
from cbsd.core.cluster.config import Config
from cbsd.core.cluster.gateway import Reader
from cbsd.errors import StateError
from cbsd.storage.paths import Workdir


def reader(wd: Workdir) -> tuple[Config, Reader]:
    cfg = config.load(wd)
    if cfg is None:
        raise StateError("cluster: this host is not a cluster node ('cbsd bcluster mode=init' "
                         "or mode=join makes it one)")
    d = config.folder(wd)
    return cfg, Reader(list(cfg.endpoints), str(d / "ca.crt"), str(d / "node.crt"),
                       str(d / "node.key"))


def snapshot(wd: Workdir) -> tuple[Config, nodes.Snapshot]:
    cfg, r = reader(wd)
    return cfg, nodes.snapshot(r)


def vm_rows(wd: Workdir) -> list[dict[str, Any]]:
    """Every clustered VM with its owner and whether that node is up: one range read."""
    _, snap = snapshot(wd)
    rows = []
    for jname, kv in sorted(snap.vms.items()):
        rec = kv.json()
        rows.append({"jname": jname, "node": rec.get("node"),
                     "node_state": "up" if snap.up(rec.get("node", "")) else "down",
                     "status": rec.get("status", "-"), "vm_ram": rec.get("ram"),
                     "vm_cpus": rec.get("cpus")})
    return rows


def owner_of(wd: Workdir, jname: str) -> tuple[str, bool, str] | None:
    """(owner, whether it is up, this node's name) of *jname*, or None: one range read."""
    cfg, snap = snapshot(wd)
    kv = snap.vms.get(jname)
    if kv is None:
        return None
    node = str(kv.json().get("node"))
    return node, snap.up(node), cfg.node
