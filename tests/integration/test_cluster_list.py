"""The cluster-wide listings with many VMs (docs/cluster.md, "Cluster-wide listings"): three
hosts of tests/guests/cluster.py, a few real VMs and 1,000 owner records over the three nodes
written to etcd directly. `bls node='*'` and `bwhereis` list every one of them, with its node,
its recorded status and whether its node is up, from any node -- and read etcd without its
client library (etcd3gw and requests are not imported: the read is the standard library's)."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator

import pytest

from tests.guests import cluster
from tests.guests.hosts import Host

pytestmark = [pytest.mark.cluster, pytest.mark.vm]
TTL = 3
SEEDED = cluster.records(1000, cluster.NAMES)


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Host]]:
    base = tmp_path_factory.mktemp("clusterlist")
    switch, made = cluster.make(base / "hosts")
    try:
        cluster.form(made, base, ttl=TTL)
        a, b, c = made
        a.cbsd("bcreate", "ra", "imgsize=16m", "vm_ram=64m").ok()
        a.cbsd("bstart", "ra").ok()
        b.cbsd("bcreate", "rb", "imgsize=16m", "vm_ram=128m", "vm_cpus=2").ok()
        c.cbsd("bcreate", "rc", "imgsize=16m", "vm_ram=64m").ok()
        cluster.seed(a, SEEDED)
        yield made
    finally:
        cluster.remove(switch, made)


def expected(down: str = "") -> list[dict[str, object]]:
    """Every VM's row, as the owner records say (real VMs as their commands left them)."""
    real = {"ra": ("a", "On", 64 << 20, 1), "rb": ("b", "Off", 128 << 20, 2),
            "rc": ("c", "Off", 64 << 20, 1)}
    rows = [{"node": n, "jname": j, "status": s, "vm_ram": ram, "vm_cpus": cpus}
            for j, (n, s, ram, cpus) in real.items()]
    rows += [{"node": r["node"], "jname": j, "status": r["status"], "vm_ram": r["ram"],
              "vm_cpus": r["cpus"]} for j, r in SEEDED.items()]
    for r in rows:
        r["node_state"] = "down" if r["node"] == down else "up"
    return sorted(rows, key=lambda r: str(r["jname"]))


def listing(h: Host, *args: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = json.loads(h.cbsd("bls", "node=*", "format=json",
                                                     *args).ok().out)
    return out


def test_every_vm_is_listed_from_every_node_with_its_node_and_state(
        three: list[Host]) -> None:
    want = expected()
    assert len(want) == 1003
    for h in three:
        assert listing(h) == want, h.name
    # the table: a header and one line per VM, each naming its node
    _a, b, c = three
    lines = c.cbsd("bls", "node=*").ok().out.splitlines()
    assert lines[0].split() == ["NODE", "JNAME", "STATUS", "VM_RAM", "VM_CPUS", "NODE_STATE"]
    assert [ln.split()[:2] for ln in lines[1:]] == [[r["node"], r["jname"]] for r in want]
    # a mask narrows it, from the same read
    assert [r["jname"] for r in listing(b, "s00*")] == [f"s{i:04d}" for i in range(100)]


def test_bwhereis_names_each_vms_node(three: list[Host]) -> None:
    c = three[2]
    for jname, owner in (("s0000", "a"), ("s0001", "b"), ("s0998", "c"), ("rb", "b")):
        for h in three:
            assert h.cbsd("bwhereis", jname).ok().out.strip() == \
                ("local" if h.name == owner else owner), (jname, h.name)
    c.cbsd("bwhereis", "nosuch").fails(1, "no node of the cluster owns")


def test_the_listings_read_etcd_without_its_client_library(three: list[Host]) -> None:
    """What the read path imports, as `python -X importtime` reports every module: neither
    etcd3gw nor requests (0.1-0.4 s of imports here) for bls node='*' and bwhereis."""
    a = three[0]
    for args in (("bls", "node=*"), ("bwhereis", "s0001")):
        p = a.ns.run(*_python(a), "-X", "importtime", "-m", "cbsd", *args)
        assert p.returncode == 0, p.stderr[-2000:]
        loaded = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines()
                  if line.startswith("import time:")}
        client = loaded & {"etcd3gw", "requests", "urllib3"}
        assert not client, (args, client)
        assert "cbsd.core.cluster.gateway" in loaded, args  # the read went through it


def _python(h: Host) -> list[str]:
    return ["env", f"CBSD_WORKDIR={h.cbsd.workdir}", sys.executable]


def state_of(h: Host, jname: str) -> object:
    return next(r["node_state"] for r in listing(h) if r["jname"] == jname)


def test_a_node_whose_lease_lapsed_shows_its_vms_down(three: list[Host]) -> None:
    a, b, c = three
    pid = int((c.cbsd.workdir / "cluster" / "keeper.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    cluster.wait_for("c down", lambda: state_of(a, "s0998") == "down", timeout=TTL * 10)
    assert listing(b) == expected(down="c")
    r = a.cbsd("bwhereis", "s0998").ok()
    assert r.out.strip() == "c" and "node c, is down" in r.err
    c.cbsd("bcluster", "mode=start").ok()
    cluster.wait_for("c up", lambda: listing(a) == expected())
