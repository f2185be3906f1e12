"""Replication to a standby (docs/cluster.md "Replication") on the three-host cluster of
tests/integration/test_cluster.py (its module fixture, formed through the CLI): the ha keys,
`bcheckpoint mode=replicate` shipping a live checkpoint to b, and the replica promoted on b
and restored there, the guest's counter going on from the replicated point with its disk
matching its memory. The tests go on from each other's state in file order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.guests.hosts import Host
from tests.integration.test_cluster import record, three  # noqa: F401  (the module fixture)
from tests.vmchecks import counting, last_count, restored_from

pytestmark = [pytest.mark.cluster, pytest.mark.vm]
SHIPPED = re.compile(r"generation (\d+) replicated to b \((\d+) bytes of memory chunks")


def replica_dir(h: Host, jname: str) -> Path:
    return h.cbsd.workdir / "cluster" / "replicas" / jname


def published(h: Host, jname: str) -> dict[str, object]:
    return dict(json.loads((replica_dir(h, jname) / "replica.json").read_text()))


def test_the_ha_keys_need_another_node_of_the_cluster(  # type: ignore[no-untyped-def]
        three: list[Host], counter_image) -> None:  # noqa: F811
    a, b, c = three
    a.trust(b)
    a.cbsd("node", "mode=add", "name=b", f"host=root@{b.addr}").ok()
    a.cbsd("bcreate", "jname=vmr", f"image={counter_image()}", "vm_os_type=other",
           "vm_ram=32m").ok()
    a.cbsd("bset", "vmr", "ha=1", "ha_node=a").fails(2, "a is this node")
    a.cbsd("bset", "vmr", "ha=1", "ha_node=zz").fails(2, "zz is not a node of the cluster")
    a.cbsd("bset", "vmr", "ha=1").fails(2, "ha=1 needs ha_node=")
    a.cbsd("bset", "vmr", "ha_interval=2s").fails(2, "shorter than 5s")
    assert record(c, "vmr").get("ha") is None  # nothing changed
    a.cbsd("bset", "vmr", "ha=1", "ha_node=b", "ha_interval=1m").ok()
    assert record(c, "vmr")["ha"] == {"node": "b", "interval": 60}


def test_replicate_ships_only_what_the_standby_lacks_and_the_promoted_replica_resumes(
        three: list[Host]) -> None:  # noqa: F811
    a, b, _c = three
    a.cbsd("bstart", "vmr").ok()
    counting(a.cbsd, "vmr")
    first = SHIPPED.search(a.cbsd("bcheckpoint", "mode=replicate", "jname=vmr").ok().out)
    assert first is not None and first.group(1) == "1"
    assert "disks: full" in first.string
    assert published(b, "vmr")["generation"] == 1
    counting(a.cbsd, "vmr")
    before = last_count(a.cbsd, "vmr")
    r = a.cbsd("bcheckpoint", "mode=replicate", "jname=vmr", "node=b").ok()
    at = (before, last_count(a.cbsd, "vmr"))
    second = SHIPPED.search(r.out)
    assert second is not None and second.group(1) == "2" and "full" not in r.out
    assert "disks: delta" in r.out  # only the clusters written since generation 1
    # the second ships the chunks generation 1 lacks: far fewer than the whole stream
    assert int(second.group(2)) < int(first.group(2)) / 2, (first.group(0), second.group(0))
    # the owner keeps the last shipped checkpoint as the base of the next one
    names = [ck["name"] for ck in a.cbsd.checkpoints("vmr")]
    assert names == ["ha-2"]
    # on b: one generation, nothing in b's inventory until promoted
    rep = replica_dir(b, "vmr")
    assert sorted(p.name for p in rep.iterdir() if p.name.startswith("gen-")) == ["gen-2.ckp"]
    assert "vmr" not in b.cbsd("bls", "header=0").ok().out.split()
    # the owner is gone (as a takeover finds it: H's part records b as the owner first)
    a.cbsd("bstop", "vmr", "noacpi=1").ok()
    a.cbsd("bremove", "vmr").ok()
    assert b.cbsd("breplica", "jname=vmr", "mode=promote").ok().out.strip() == "ha-2"
    assert not rep.exists()
    # run again (a promote cut short is re-run): the same answer, nothing more
    assert b.cbsd("breplica", "jname=vmr", "mode=promote").ok().out.strip() == "ha-2"
    restored_from(b.cbsd, "vmr", "ha-2", at)
    assert record(a, "vmr")["node"] == "b"
