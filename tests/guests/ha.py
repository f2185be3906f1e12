"""What the HA tests and the HA bench do to the three cluster hosts (tests/guests/cluster.py):
an HA counter guest with a replica on its standby, a host cut off (links down, everything
still running) or dead (every process in its namespace killed, links down), the etcd side
seen from another host, and the guests' consoles watched for two copies advancing at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.guests.hosts import Host
from tests.harness import COUNTER_RE, Result, counter_lines
from tests.vmchecks import counting, last_count


def _etcdctl(observer: Host, *args: str, timeout: float = 60) -> str:
    """etcdctl against *observer*'s member; its output. A query that gets no answer (an
    election under way: a healed member may call one) is asked again, until *timeout*."""
    d = observer.cbsd.workdir / "cluster"
    deadline = time.monotonic() + timeout
    while True:
        r = observer.ns.run("etcdctl", "--dial-timeout=2s", "--command-timeout=3s",
                            f"--endpoints=https://{observer.addr}:2379", "--cacert",
                            str(d / "ca.crt"), "--cert", str(d / "node.crt"), "--key",
                            str(d / "node.key"), *args, timeout=20)
        if r.returncode == 0:
            return r.stdout
        if time.monotonic() > deadline:
            raise RuntimeError(f"etcdctl on {observer.name}: {r.stderr.strip()}")
        time.sleep(0.2)


def etcd_get(observer: Host, key: str) -> str | None:
    """Whether *key* exists as *observer*'s etcd member answers now ("present" or None)."""
    return "present" if json.loads(_etcdctl(observer, "get", key, "-w", "json")).get(
        "kvs") else None


def record(observer: Host, jname: str) -> dict[str, object]:
    out = _etcdctl(observer, "get", f"/cbsd/vm/{jname}", "--print-value-only")
    return json.loads(out) if out.strip() else {}


def qemu_running(h: Host, jname: str) -> bool:
    """Whether the QEMU the VM's pid file names runs (read from /proc, as cbsd does)."""
    try:
        pid = int((h.cbsd.system(jname) / "qemu.pid").read_text())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, ValueError):
        return False
    return state not in (b"Z", b"X") and str(h.cbsd.system(jname)).encode() in cmd


def arm(owner: Host, standby: Host, jname: str, interval: str = "5s") -> None:
    """*jname* (running on *owner*) an HA VM with *standby* as its standby."""
    owner.trust(standby)
    nodes = owner.cbsd("node", "mode=list", "format=json").ok().out
    if standby.name not in [n["name"] for n in json.loads(nodes or "[]")]:
        owner.cbsd("node", "mode=add", f"name={standby.name}",
                   f"host=root@{standby.addr}").ok()
    owner.cbsd("bset", jname, "ha=1", f"ha_node={standby.name}",
               f"ha_interval={interval}").ok()


def not_busy(h: Host, *args: str, timeout: float = 120) -> Result:
    """The command on *h*, again while it finds the VM busy (exit 75): a replication the
    keeper started before a partition may hold the VM until its ssh gives up."""
    deadline = time.monotonic() + timeout
    while True:
        r = h.cbsd(*args, timeout=600)
        if r.code != 75 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def replicate(owner: Host, jname: str) -> tuple[int, int]:
    """Ship a generation now; (last count before, last count after): the replicated count
    lies between them (a periodic one may publish a newer one after it)."""
    counting(owner.cbsd, jname, 2)
    before = last_count(owner.cbsd, jname)
    # the keeper's periodic replication may hold the VM (busy): the count is read before it
    not_busy(owner, "bcheckpoint", "mode=replicate", f"jname={jname}").ok()
    return before, last_count(owner.cbsd, jname)


def ns_pids(h: Host) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", h.ns.name], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def die(h: Host) -> float:
    """The host dies: its links go down and every process in its namespace is SIGKILLed
    (etcd, keeper, QEMU, sshd, anything else); the moment it was dead (time.time())."""
    h.link(False)
    deadline = time.monotonic() + 30
    while pids := ns_pids(h):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"{h.name}'s processes outlived SIGKILL"
        time.sleep(0.02)
    return time.time()


@dataclass
class Consoles:
    """Samples the consoles of (host, jname) copies every 50 ms in a thread: when each
    grew. Two copies advancing at once -- a split brain -- shows as overlapping spans."""
    copies: list[tuple[Host, str]]
    grew: dict[str, list[float]] = field(default_factory=dict)
    both_running: int = 0  # samples in which two copies' QEMUs ran at once
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Consoles:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _size(self, h: Host, jname: str) -> int:
        try:
            return (h.cbsd.system(jname) / "console.log").stat().st_size
        except OSError:
            return -1

    def _run(self) -> None:
        last = {h.name: self._size(h, j) for h, j in self.copies}
        while not self._stop.is_set():
            now = time.time()
            for h, j in self.copies:
                size = self._size(h, j)
                if size > last[h.name] >= 0 or (last[h.name] < 0 <= size):
                    self.grew.setdefault(h.name, []).append(now)
                last[h.name] = size
            if sum(qemu_running(h, j) for h, j in self.copies) > 1:
                self.both_running += 1
            time.sleep(0.05)

    def overlaps(self) -> int:
        """How many sample instants two copies' consoles both grew within 1 s of (the
        counter prints several lines a second: a live copy grows in every such window)."""
        names = list(self.grew)
        clashes = 0
        for i, x in enumerate(names):
            for y in names[i + 1:]:
                clashes += sum(1 for t in self.grew[x]
                               if any(abs(t - u) < 1.0 for u in self.grew[y]))
        return clashes


def first_count(h: Host, jname: str, timeout: float) -> tuple[int, float]:
    """Wait until the copy on *h* prints two counter lines; (the first count, when the
    first line was seen). No reboot: its console has no BOOT line."""
    con = h.cbsd.console(jname)
    deadline = time.monotonic() + timeout
    while True:
        lines = counter_lines(con.text())
        if lines:
            seen = time.time()
            break
        assert time.monotonic() < deadline, f"{jname} never ran on {h.name}"
        time.sleep(0.05)
    con.wait(COUNTER_RE, count=2)
    lines = counter_lines(con.text())
    assert "BOOT" not in con.text(), "a takeover must not reboot the guest"
    assert all(ok == "OK" for _, _, ok in lines), lines  # its disk matches its memory
    return lines[0][0], seen


def revive(h: Host) -> None:
    """A dead host back: its link up, its sshd again (same config and host key), then
    `bcluster mode=start` (the member from its data, the keeper)."""
    h.link(True)
    log = h.root / "sshd.log"
    log.write_bytes(b"")
    h.sshd = subprocess.Popen([*h.ns.prefix, "/usr/sbin/sshd", "-D", "-e", "-f",
                               str(h.root / "sshd_config")], stdout=subprocess.DEVNULL,
                              stderr=open(log, "wb"))  # noqa: SIM115
    deadline = time.monotonic() + 20
    while b"Server listening" not in log.read_bytes():
        assert h.sshd.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    h.cbsd("bcluster", "mode=start", timeout=120).ok()
