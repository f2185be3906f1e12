"""Replication to a standby (docs/cluster.md "Replication") on the three-host cluster of
tests/integration/test_cluster.py (its module fixture, formed through the CLI): the ha keys,
`bcheckpoint mode=replicate` shipping a live checkpoint to b, and the replica promoted on b
and restored there, the guest's counter going on from the replicated point with its disk
matching its memory. The tests go on from each other's state in file order."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from cbsd.storage.chunkstore import RECIPE, Recipe
from cbsd.storage.paths import Workdir
from tests.guests import cluster
from tests.guests.hosts import Host, stopped_at, stopped_node_half
from tests.integration.test_cluster import record, three  # noqa: F401  (the module fixture)
from tests.vmchecks import counting, last_count, restored_from

pytestmark = [pytest.mark.cluster, pytest.mark.vm]
AT: dict[str, tuple[int, int]] = {}  # the counter's range at the last acknowledged generation
SHIPPED = re.compile(r"generation (\d+) replicated to b \((\d+) bytes of memory chunks")


def replica_dir(h: Host, jname: str) -> Path:
    return h.cbsd.workdir / "cluster" / "replicas" / jname


def recipe(h: Host, jname: str, name: str) -> Recipe:
    """The memory recipe (chunk list) of *h*'s checkpoint *name* of *jname*."""
    return Recipe.read(Workdir(h.cbsd.workdir).checkpoint(jname, name) / RECIPE)


def published(h: Host, jname: str) -> dict[str, object]:
    return dict(json.loads((replica_dir(h, jname) / "replica.json").read_text()))


def test_the_ha_keys_need_another_node_of_the_cluster(  # type: ignore[no-untyped-def]
        three: list[Host], counter_image) -> None:  # noqa: F811
    a, b, c = three
    a.trust(b)
    a.cbsd("node", "mode=add", "name=b", f"host=root@{b.addr}").ok()
    # vm_ramfile=off: replication ships chunks of a folded stream, which a VM whose RAM is a
    # file (pass 3's XFS) does not have (docs/cluster.md, "What is not guaranteed")
    a.cbsd("bcreate", "jname=vmr", f"image={counter_image()}", "vm_os_type=other",
           "vm_ram=32m", "vm_ramfile=off").ok()
    a.cbsd("bset", "vmr", "ha=1", "ha_node=a").fails(2, "a is this node")
    a.cbsd("bset", "vmr", "ha=1", "ha_node=zz").fails(2, "zz is not a node of the cluster")
    a.cbsd("bset", "vmr", "ha=1").fails(2, "ha=1 needs ha_node=")
    a.cbsd("bset", "vmr", "ha_interval=2s").fails(2, "shorter than 5s")
    assert record(c, "vmr").get("ha") is None  # nothing changed
    a.cbsd("bset", "vmr", "ha=1", "ha_node=b", "ha_interval=1m").ok()
    assert record(c, "vmr")["ha"] == {"node": "b", "interval": 60}
    # off until the periodic job's test below: the tests before it replicate by hand
    a.cbsd("bset", "vmr", "ha=0").ok()
    assert record(c, "vmr")["ha"] is None


def test_replicate_ships_only_what_the_standby_lacks_and_the_promoted_replica_resumes(
        three: list[Host]) -> None:  # noqa: F811
    a, b, _c = three
    a.cbsd("bstart", "vmr").ok()
    counting(a.cbsd, "vmr")
    first = SHIPPED.search(a.cbsd("bcheckpoint", "mode=replicate", "jname=vmr").ok().out)
    assert first is not None and first.group(1) == "1"
    assert "disks: full" in first.string
    assert published(b, "vmr")["generation"] == 1
    had = {e[0] for e in recipe(a, "vmr", "ha-1").entries}
    counting(a.cbsd, "vmr")
    r = a.cbsd("bcheckpoint", "mode=replicate", "jname=vmr", "node=b").ok()
    second = SHIPPED.search(r.out)
    assert second is not None and second.group(1) == "2" and "full" not in r.out
    assert "disks: delta" in r.out  # only the clusters written since generation 1
    # the second ships exactly the chunks of its stream that generation 1 lacks (each once),
    # and the guest's unchanged memory is not among them
    now = recipe(a, "vmr", "ha-2")
    lacking = {d: n for d, _, _, n in now.entries if d not in had}
    assert int(second.group(2)) == sum(lacking.values()), second.group(0)
    assert len(lacking) < len({e[0] for e in now.entries}), "every chunk was new"
    # the owner keeps the last shipped checkpoint as the base of the next one
    names = [ck["name"] for ck in a.cbsd.checkpoints("vmr")]
    assert names == ["ha-2"]
    # on b: one generation, nothing in b's inventory until promoted
    rep = replica_dir(b, "vmr")
    assert sorted(p.name for p in rep.iterdir() if p.name.startswith("gen-")) == ["gen-2.ckp"]
    assert "vmr" not in b.cbsd("bls", "header=0").ok().out.split()


def apply_running() -> bool:
    return any(b"-m\x00cbsd\x00breplica\x00mode=apply" in cmdline(pid) for pid in pids())


def pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_replication_cut_short_or_damaged_leaves_the_published_replica_and_the_next_one_ships_from_it(  # noqa: E501
        three: list[Host]) -> None:  # noqa: F811
    a, b, _c = three
    # the standby killed -9 once the new generation's disk snapshots exist, before it is
    # published: the owner fails, drops its ha-3; the standby still has generation 2
    with b.cbsd_as(f"CBSD_FAILPOINT=replica:disks {b.real_cbsd}"):
        p = a.cbsd.popen("bcheckpoint", "mode=replicate", "jname=vmr")
        os.kill(stopped_node_half(b"breplica\x00mode=apply", p), signal.SIGKILL)
        _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    assert published(b, "vmr")["generation"] == 2
    assert [ck["name"] for ck in a.cbsd.checkpoints("vmr")] == ["ha-2"]
    # the stream damaged on the way (one byte): refused as a whole, nothing published
    with b.cbsd_as(f"{{ head -c 60000; head -c 1 >/dev/null; printf Z; cat; }} | "
                   f"{b.real_cbsd}"):
        a.cbsd("bcheckpoint", "mode=replicate", "jname=vmr").fails(
            1, "node b: chunks in the archive does not match its checksum")
    assert published(b, "vmr")["generation"] == 2
    # the owner killed -9 while shipping: the standby reads a truncated stream, publishes
    # nothing; the owner's unacknowledged checkpoint stays until the next one succeeds
    p = stopped_at(a.cbsd, "replicate:shipping", "bcheckpoint", "mode=replicate", "jname=vmr")
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    cluster.wait_for("the standby's apply ended", lambda: not apply_running())
    assert published(b, "vmr")["generation"] == 2
    before = last_count(a.cbsd, "vmr")
    r = a.cbsd("bcheckpoint", "mode=replicate", "jname=vmr").ok()
    AT["last"] = (before, last_count(a.cbsd, "vmr"))
    done = SHIPPED.search(r.out)
    assert done is not None and "full" not in r.out and "disks: delta" in r.out, r.out
    gen = int(done.group(1))
    assert published(b, "vmr")["generation"] == gen
    assert [ck["name"] for ck in a.cbsd.checkpoints("vmr")] == [f"ha-{gen}"]
    rep = replica_dir(b, "vmr")
    assert sorted(p.name for p in rep.iterdir() if "gen-" in p.name) == [f"gen-{gen}.ckp"]
    counting(a.cbsd, "vmr")  # the guest ran on, its disk matching its memory


def test_a_replication_without_a_base_onto_the_replica_and_the_next_one_on_it(
        three: list[Host]) -> None:  # noqa: F811
    a, b, _c = three
    gen = int(str(published(b, "vmr")["generation"]))
    # the owner lost its base (here: its ha-G destroyed; an acknowledgement lost, a
    # destroyall, a move do the same): the next one ships everything, onto a replica that
    # has most of those chunks already
    a.cbsd("bcheckpoint", "mode=destroy", "jname=vmr", f"name=ha-{gen}").ok()
    r = a.cbsd("bcheckpoint", "mode=replicate", "jname=vmr").ok()
    assert "full: no base there" in r.out, r.out
    assert published(b, "vmr")["generation"] == gen + 1
    r = a.cbsd("bcheckpoint", "mode=replicate", "jname=vmr").ok()  # and on it again
    assert "full" not in r.out and published(b, "vmr")["generation"] == gen + 2, r.out
    counting(a.cbsd, "vmr")


def replicating() -> bool:
    return any(b"bcheckpoint\x00mode=replicate\x00jname=vmr" in cmdline(p) for p in pids())


def test_the_keeper_replicates_every_interval_and_mode_list_shows_the_chain(
        three: list[Host]) -> None:  # noqa: F811
    a, b, c = three
    start = int(str(published(b, "vmr")["generation"]))
    a.cbsd("bset", "vmr", "ha=1", "ha_interval=5s").ok()  # while it runs
    assert record(c, "vmr")["ha"] == {"node": "b", "interval": 5}
    cluster.wait_for("two periodic replications",
                     lambda: int(str(published(b, "vmr")["generation"])) >= start + 2,
                     timeout=180)
    log = (a.cbsd.workdir / "cluster" / "hasched.log").read_text()
    assert "vmr exit 0: vmr: generation" in log, log
    # while a periodic replication holds the VM, bset is refused as busy (75): try again
    cluster.wait_for("ha=0 set", lambda: a.cbsd("bset", "vmr", "ha=0").code == 0)
    cluster.wait_for("the last periodic replication ended", lambda: not replicating())
    before = last_count(a.cbsd, "vmr")
    r = a.cbsd("bcheckpoint", "mode=replicate", "jname=vmr").ok()
    AT["last"] = (before, last_count(a.cbsd, "vmr"))
    gen = published(b, "vmr")["generation"]
    listed = a.cbsd("bcheckpoint", "mode=list", "jname=vmr").ok().out
    assert f"ha-{gen} * (replicated on b as generation {gen} ({gen} on " in listed, (r.out,
                                                                                      listed)
    counting(a.cbsd, "vmr")


def test_the_promoted_replica_resumes_from_the_replicated_point(
        three: list[Host]) -> None:  # noqa: F811
    a, b, _c = three
    name = f"ha-{published(b, 'vmr')['generation']}"
    rep = replica_dir(b, "vmr")
    # the owner is gone (as a takeover finds it: H's part records b as the owner first)
    a.cbsd("bstop", "vmr", "noacpi=1").ok()
    a.cbsd("bremove", "vmr").ok()
    # a promote killed -9 half-way (its files linked, the VM not yet registered) is run again
    p = stopped_at(b.cbsd, "replica:promoting", "breplica", "jname=vmr", "mode=promote")
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    assert (rep / "replica.json").exists()
    assert b.cbsd("breplica", "jname=vmr", "mode=promote").ok().out.strip() == name
    assert not rep.exists()
    # and again: the same answer, nothing more
    assert b.cbsd("breplica", "jname=vmr", "mode=promote").ok().out.strip() == name
    restored_from(b.cbsd, "vmr", name, AT["last"])
    assert record(a, "vmr")["node"] == "b"
