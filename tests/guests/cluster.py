"""Three hosts for the cluster tests: three network namespaces, each with one veth end
(10.253.0.1-3) whose other end sits on a bridge in a fourth namespace (the switch), each with
its own sshd, workdir and cbsd (tests/guests/hosts.py's Host), and -- once the test forms the
cluster -- its own etcd member and lease keeper. Nothing leaves the machine: the namespaces
have no other link and no route."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.guests import hosts
from tests.guests.hosts import Host
from tests.guests.netns import Netns
from tests.harness import Cbsd, killed_until_gone

SUBNET = "10.253.0"
NAMES = ("a", "b", "c")


def make(base: Path) -> tuple[Netns, list[Host]]:
    base.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(base / "id_ed25519")], check=True)
    switch = Netns.create("csw")
    subprocess.run(["ip", "-n", switch.name, "link", "add", "br0", "type", "bridge"], check=True)
    subprocess.run(["ip", "-n", switch.name, "link", "set", "br0", "up"], check=True)
    made = []
    for i, name in enumerate(NAMES, start=1):
        ns = Netns.create(f"c{name}")
        root = base / name
        root.mkdir()
        h = Host(name, ns, f"{SUBNET}.{i}", root, Cbsd(root / "wd", prefix=ns.prefix))
        h.cbsd.env["CBSD_SSH_CONFIG"] = str(root / "ssh_config")
        made.append(h)
        subprocess.run(["ip", "-n", switch.name, "link", "add", f"p{i}", "type", "veth", "peer",
                        "name", "h0", "netns", ns.name], check=True)
        subprocess.run(["ip", "-n", switch.name, "link", "set", f"p{i}", "master", "br0", "up"],
                       check=True)
        subprocess.run(["ip", "-n", ns.name, "addr", "add", f"{h.addr}/24", "dev", "h0"],
                       check=True)
        subprocess.run(["ip", "-n", ns.name, "link", "set", "h0", "up"], check=True)
        hosts._start_sshd(h, base)
    return switch, made


def cluster_processes(wd: Path) -> list[int]:
    """The etcd member and the lease keeper of workdir *wd* (their command lines name it)."""
    mark = str(wd).encode()
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if mark in cmd and (cmd.startswith(b"etcd\0") or b"cbsd.core.cluster.keeper" in cmd):
            found.append(pid)
    return found


def kill_cluster(wd: Path, timeout: float = 30) -> None:
    killed_until_gone(lambda: cluster_processes(wd), "cluster processes", timeout)


def remove(switch: Netns, made: list[Host]) -> None:
    for h in made:
        kill_cluster(h.cbsd.workdir)
    hosts.remove(tuple(made))
    switch.delete()


def wait_for(what: str, check: object, timeout: float = 60) -> None:
    """Until check() is true, within *timeout* s (a condition, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)



def form(made: list[Host], base: Path, ttl: int = 10) -> None:
    """The cluster of *made* through the CLI: init on the first, issue + join for the others
    (each a member)."""
    first, *rest = made
    first.cbsd("bcluster", "mode=init", f"name={first.name}", f"address={first.addr}",
               f"ttl={ttl}").ok()
    for h in rest:
        bundle = base / f"bundle-{h.name}"
        first.cbsd("bcluster", "mode=issue", f"name={h.name}", f"address={h.addr}",
                   f"out={bundle}").ok()
        h.cbsd("bcluster", "mode=join", f"name={h.name}", f"address={h.addr}",
               f"bundle={bundle}").ok()
