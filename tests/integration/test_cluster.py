"""The cluster (docs/cluster.md) on three hosts (tests/guests/cluster.py): each its own etcd
member, sshd and workdir. The cluster is formed once for the module, through the CLI, and the
tests go on from each other's state in file order: TLS, nodes, ownership, bmove, leases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guests import cluster
from tests.guests.hosts import Host, kill_cbsd_running, stopped_at
from tests.vmchecks import counting

pytestmark = [pytest.mark.cluster, pytest.mark.vm]
TTL = 3


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Host]]:
    base = tmp_path_factory.mktemp("cluster")
    switch, made = cluster.make(base / "hosts")
    try:
        a, b, c = made
        # Before the cluster: a and b each have a VM named vm0 (say, a copy made with
        # bexport/bimport in SSH-only days). a's init claims it; b's join finds it taken.
        for h in (a, b):
            h.cbsd("bcreate", "vm0", "imgsize=16m", "vm_ram=64m").ok()
        r = a.cbsd("bcluster", "mode=init", "name=a", f"address={a.addr}", f"ttl={TTL}").ok()
        assert "cluster made" in r.out
        for h in (b, c):
            bundle = base / f"bundle-{h.name}"
            a.cbsd("bcluster", "mode=issue", f"name={h.name}", f"address={h.addr}",
                   f"out={bundle}").ok()
            r = h.cbsd("bcluster", "mode=join", f"name={h.name}", f"address={h.addr}",
                       f"bundle={bundle}").ok()
            assert "joined" in r.out
        yield made
    finally:
        cluster.remove(switch, made)


def status(h: Host) -> dict[str, dict[str, object]]:
    rows = json.loads(h.cbsd("bcluster", "mode=status", "format=json").ok().out)
    return {r["node"]: r for r in rows}


def etcdctl(h: Host, *args: str, cert: bool = True) -> subprocess.CompletedProcess[str]:
    d = h.cbsd.workdir / "cluster"
    tls = ["--cacert", str(d / "ca.crt")]
    if cert:
        tls += ["--cert", str(d / "node.crt"), "--key", str(d / "node.key")]
    return h.ns.run("etcdctl", "--dial-timeout=3s", "--command-timeout=5s",
                    f"--endpoints=https://{h.addr}:2379", *tls, *args, timeout=30)


def test_three_members_form_with_tls_and_a_client_without_certificate_is_refused(
        three: list[Host]) -> None:
    a, b, c = three
    members = etcdctl(c, "member", "list", "-w", "json")
    assert members.returncode == 0, members.stderr
    listed = json.loads(members.stdout)["members"]
    assert sorted(m["name"] for m in listed) == ["a", "b", "c"]
    assert all(u.startswith("https://") for m in listed for u in m["clientURLs"] + m["peerURLs"])
    # the cluster's own CA, but no client certificate: refused (etcd's client-cert-auth)
    assert etcdctl(b, "get", "/cbsd/", "--prefix", cert=False).returncode != 0
    # no TLS at all: nothing answers plain HTTP
    plain = b.ns.run("curl", "-sS", "-m", "5", f"http://{a.addr}:2379/version")
    assert plain.returncode != 0 or "etcdserver" not in plain.stdout
    # every file of the cluster's is the owner's only
    for h in three:
        for f in (h.cbsd.workdir / "cluster").iterdir():
            assert f.stat().st_mode & 0o077 == 0, f


def test_nodes_register_what_they_offer(three: list[Host]) -> None:
    _a, _b, c = three
    rows = status(c)
    assert sorted(rows) == ["a", "b", "c"]
    for h in three:
        row = rows[h.name]
        assert row["state"] == "up" and row["address"] == h.addr
        assert int(row["mem_total"]) > 0 and int(row["cpus"]) >= 1  # type: ignore[call-overload]
        assert row["qemu"] and row["accel"] in ("kvm", "tcg")


def test_a_vm_is_owned_by_its_node_and_changes_from_another_node_are_refused(
        three: list[Host]) -> None:
    a, b, c = three
    a.cbsd("bcreate", "vm1", "imgsize=16m", "vm_ram=64m").ok()
    assert c.cbsd("bwhereis", "vm1").ok().out.strip() == "a"
    assert a.cbsd("bwhereis", "vm1").ok().out.strip() == "local"
    # the same name anywhere else is refused: one owner per VM name in the cluster
    b.cbsd("bcreate", "vm1", "imgsize=16m").fails(1, "vm1: owned by node a")
    assert b.cbsd("bls", "header=0").ok().out.split().count("vm1") == 0
    # b's own copy of vm0 (a claimed the name first): every change to it is refused there
    b.cbsd("bset", "vm0", "vm_cpus=2").fails(1, "vm0: owned by node a")
    b.cbsd("bstart", "vm0").fails(1, "vm0: owned by node a")
    b.cbsd("bremove", "vm0").fails(1, "vm0: owned by node a")
    assert json.loads(b.cbsd("bget", "vm0", "format=json").ok().out)["vm_cpus"] == 1
    # the owner changes it, and the record says what it did
    a.cbsd("bset", "vm0", "vm_cpus=2").ok()


def test_cluster_wide_bls_comes_from_etcd(three: list[Host]) -> None:
    _a, _b, c = three
    rows = json.loads(c.cbsd("bls", "node=*", "format=json").ok().out)
    by_name = {r["jname"]: r for r in rows}
    assert by_name["vm1"]["node"] == "a" and by_name["vm1"]["node_state"] == "up"
    assert by_name["vm1"]["vm_ram"] == 64 << 20 and by_name["vm0"]["vm_cpus"] == 2
    # c has no VM and no `cbsd node`: the listing is etcd's, not an ssh fan-out
    assert c.cbsd("node", "mode=list").ok().out.strip() in ("", "NAME  HOST  PORT")


def test_bmove_switches_the_owner_record(three: list[Host]) -> None:
    a, b, c = three
    a.trust(b)
    a.cbsd("node", "mode=add", "name=b", f"host=root@{b.addr}").ok()
    a.cbsd("bmove", "vm1", "node=b").ok()
    assert c.cbsd("bwhereis", "vm1").ok().out.strip() == "b"
    assert json.loads(b.cbsd("bls", "format=json").ok().out)[-1]["jname"] in ("vm0", "vm1")
    b.cbsd("bset", "vm1", "vm_cpus=2").ok()  # the new owner may change it
    assert record(c, "vm1")["node"] == "b" and "from" not in record(c, "vm1")
    a.cbsd("bcreate", "vm1", "imgsize=16m").fails(1, "vm1: owned by node b")


def record(h: Host, jname: str) -> dict[str, object]:
    out = etcdctl(h, "get", f"/cbsd/vm/{jname}", "--print-value-only")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if out.stdout.strip() else {}


def test_bmigrate_hands_the_owner_over_and_a_failed_one_gives_it_back(  # type: ignore[no-untyped-def]
        three: list[Host], counter_image) -> None:
    a, b, c = three
    image = counter_image(fill_mib=4)
    a.cbsd("bcreate", "jname=vmm", f"image={image}", "vm_os_type=other", "vm_ram=32m").ok()
    a.cbsd("bstart", "vmm").ok()
    counting(a.cbsd, "vmm")
    # a migration stopped mid-way: the record already names b (from a); b's half then dies
    p = stopped_at(a.cbsd, "bmigrate:forwarded", "bmigrate", "jname=vmm", "node=b")
    assert record(c, "vmm")["node"] == "b" and record(c, "vmm")["from"] == "a"
    kill_cbsd_running(b"bmigrate\x00mode=incoming")
    os.kill(p.pid, signal.SIGCONT)
    p.communicate(timeout=300)
    assert p.returncode == 1
    assert record(c, "vmm")["node"] == "a" and "from" not in record(c, "vmm")
    assert a.cbsd.status("vmm") == "On"
    a.cbsd("bpause", "vmm", "mode=on").ok()  # a still owns it: its commands run
    a.cbsd("bpause", "vmm", "mode=off").ok()
    # and a migration that succeeds leaves the record with b, taken up
    a.cbsd("bmigrate", "jname=vmm", "node=b", timeout=600).ok()
    assert record(c, "vmm")["node"] == "b" and "from" not in record(c, "vmm")
    assert c.cbsd("bwhereis", "vmm").ok().out.strip() == "b"
    counting(b.cbsd, "vmm")
    a.cbsd("bcreate", "vmm", "imgsize=16m").fails(1, "vmm: owned by node b")
    b.cbsd("bstop", "vmm", "noacpi=1").ok()


def test_bcreate_node_auto_picks_the_node_with_most_free_memory(three: list[Host]) -> None:
    a, b, c = three
    # a and b each keep a stopped 8g VM (counted as taken: it takes its RAM when it starts);
    # all three share this machine's free memory, so c has the most by 8g
    a.cbsd("bcreate", "biga", "imgsize=16m", "vm_ram=8g").ok()
    b.cbsd("bcreate", "bigb", "imgsize=16m", "vm_ram=8g").ok()
    a.trust(c)
    a.cbsd("node", "mode=add", "name=c", f"host=root@{c.addr}").ok()
    a.cbsd("bcreate", "vmauto", "imgsize=16m", "vm_ram=64m", "node=auto").ok()
    assert record(b, "vmauto")["node"] == "c"
    assert [r["jname"] for r in json.loads(c.cbsd("bls", "format=json").ok().out)] == ["vmauto"]
    # more than any live node has free: refused here, nothing created anywhere
    a.cbsd("bcreate", "vmhuge", "imgsize=16m", "vm_ram=64t", "node=auto").fails(
        1, "no live node has")
    assert record(b, "vmhuge") == {}
    c.cbsd("bremove", "vmauto").ok()
    assert record(b, "vmauto") == {}


def test_a_node_whose_keeper_is_killed_shows_down_after_its_lease(three: list[Host]) -> None:
    a, b, c = three
    cluster.wait_for("c up", lambda: status(a)["c"]["state"] == "up")
    pid = int((c.cbsd.workdir / "cluster" / "keeper.pid").read_text())
    subprocess.run(["kill", "-9", str(pid)], check=True)
    cluster.wait_for("c down", lambda: status(a)["c"]["state"] == "down", timeout=TTL * 10)
    assert status(b)["a"]["state"] == "up" and status(b)["b"]["state"] == "up"
    # bcluster mode=start (what a reboot needs) brings the keeper back: up again
    c.cbsd("bcluster", "mode=start").ok()
    cluster.wait_for("c up again", lambda: status(a)["c"]["state"] == "up")


def test_a_node_that_leaves_is_no_member_and_no_node(three: list[Host]) -> None:
    a, _b, c = three
    c.cbsd("bcluster", "mode=leave").ok()
    assert "c" not in status(a)
    listed = json.loads(etcdctl(a, "member", "list", "-w", "json").stdout)["members"]
    assert sorted(m["name"] for m in listed) == ["a", "b"]
    assert cluster.cluster_processes(c.cbsd.workdir) == []
    assert not (c.cbsd.workdir / "cluster").exists()
    c.cbsd("bcreate", "vm9", "imgsize=16m").ok()  # SSH-only again: no guard, no etcd
    # bls node='*' is the SSH fan-out again (this host as 'local'), not etcd's listing
    assert c.cbsd("bls", "node=*", "header=0").ok().out.split()[:2] == ["local", "vm9"]


def test_a_node_joins_as_a_client_of_the_members(three: list[Host], tmp_path: Path) -> None:
    a, b, c = three  # c left (above), with vm9 in its inventory
    a.cbsd("bcluster", "mode=issue", "name=c", f"address={c.addr}",
           f"out={tmp_path / 'bundle'}").ok()
    r = c.cbsd("bcluster", "mode=join", "name=c", f"address={c.addr}",
               f"bundle={tmp_path / 'bundle'}", "member=0").ok()
    assert "(client)" in r.out
    cluster.wait_for("c up", lambda: status(b).get("c", {}).get("state") == "up")
    listed = json.loads(etcdctl(a, "member", "list", "-w", "json").stdout)["members"]
    assert sorted(m["name"] for m in listed) == ["a", "b"]  # no member on c
    assert not any(p for p in cluster.cluster_processes(c.cbsd.workdir)
                   if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"etcd\0"))
    assert record(a, "vm9")["node"] == "c"  # the join claimed c's VM
    b.cbsd("bcreate", "vm9", "imgsize=16m").fails(1, "vm9: owned by node c")
