"""Two hosts on one machine for the many-hosts tests: two network namespaces joined by a veth
pair (10.251.0.1 and 10.251.0.2, nothing else), each with its own sshd on its own address (key
authentication only, its own host key), its own workdir and its own cbsd, which its sshd's
login environment selects. No traffic can leave the machine: the namespaces have no other
link and no route."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.guests.netns import Netns
from tests.harness import Cbsd, kill_vms, proc_state

SUBNET = "10.251.0"


@dataclass
class Host:
    name: str
    ns: Netns
    addr: str
    root: Path
    cbsd: Cbsd
    sshd: subprocess.Popen[bytes] | None = None

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def host_key(self) -> str:
        """This host's public key as a known_hosts line."""
        key = (self.root / "host_key.pub").read_text().split()
        return f"{self.addr} {key[0]} {key[1]}\n"

    @property
    def wrapper(self) -> Path:
        """The `cbsd` this host's sshd logins run (a shell script: tests may swap it)."""
        return self.root / "bin" / "cbsd"

    @contextlib.contextmanager
    def cbsd_as(self, script: str) -> Iterator[None]:
        """Logins here run *script* (a /bin/sh body; "$@" are cbsd's arguments) instead of
        cbsd, e.g. a cbsd that hangs or answers garbage, or one with a failpoint set."""
        plain = self.wrapper.read_text()
        self.wrapper.write_text(f"#!/bin/sh\n{script}\n")
        try:
            yield
        finally:
            self.wrapper.write_text(plain)

    @property
    def real_cbsd(self) -> str:
        """The line of the wrapper that runs cbsd (to prefix with variables)."""
        return self.wrapper.read_text().splitlines()[1]

    def link(self, up: bool) -> None:
        """Plug or unplug this host's end of the wire: the other host cannot reach it."""
        subprocess.run(["ip", "-n", self.ns.name, "link", "set", "h0", "up" if up else "down"],
                       check=True)

    def trust(self, other: Host) -> None:
        """Put *other*'s host key into this host's known_hosts (what an admin does after
        comparing the fingerprint)."""
        with open(self.known_hosts, "a") as f:
            f.write(other.host_key)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True)


def make(base: Path) -> tuple[Host, Host]:
    base.mkdir(parents=True, exist_ok=True)
    _keygen(base / "id_ed25519")
    hosts = []
    for i, name in enumerate(("a", "b"), start=1):
        ns = Netns.create(f"h{name}")
        root = base / name
        root.mkdir()
        env_cfg = root / "ssh_config"
        hosts.append(Host(name, ns, f"{SUBNET}.{i}", root,
                          Cbsd(root / "wd", prefix=ns.prefix)))
        hosts[-1].cbsd.env["CBSD_SSH_CONFIG"] = str(env_cfg)
    a, b = hosts
    subprocess.run(["ip", "-n", a.ns.name, "link", "add", "h0", "type", "veth", "peer", "name",
                    "h0", "netns", b.ns.name], check=True)
    for h in hosts:
        subprocess.run(["ip", "-n", h.ns.name, "addr", "add", f"{h.addr}/24", "dev", "h0"],
                       check=True)
        subprocess.run(["ip", "-n", h.ns.name, "link", "set", "h0", "up"], check=True)
        _start_sshd(h, base)
    return a, b


def _start_sshd(h: Host, base: Path) -> None:
    _keygen(h.root / "host_key")
    (h.root / "authorized_keys").write_text((base / "id_ed25519.pub").read_text())
    h.known_hosts.touch()
    (h.root / "ssh_config").write_text(
        "Host *\n"
        f"  IdentityFile {base / 'id_ed25519'}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {h.known_hosts}\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n"
        "  User root\n")
    bindir = h.root / "bin"
    bindir.mkdir()
    (bindir / "cbsd").write_text(f'#!/bin/sh\nexec {sys.executable} -m cbsd "$@"\n')
    (bindir / "cbsd").chmod(0o755)
    path = f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    pythonpath = os.environ.get("PYTHONPATH", "")
    extra = f" PYTHONPATH={pythonpath}" if pythonpath else ""
    for var in ("CBSD_QEMU", "CBSD_QEMU_IMG", "CBSD_TEST_RAMFILE"):
        if os.environ.get(var):
            extra += f" {var}={os.environ[var]}"
    config = h.root / "sshd_config"
    config.write_text(
        f"ListenAddress {h.addr}\n"
        "Port 22\n"
        f"HostKey {h.root / 'host_key'}\n"
        f"PidFile {h.root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {h.root / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        f"SetEnv CBSD_WORKDIR={h.cbsd.workdir} CBSD_SSH_CONFIG={h.root / 'ssh_config'} "
        f"PATH={path}{extra}\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    h.sshd = subprocess.Popen([*h.ns.prefix, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                              stdout=subprocess.DEVNULL,
                              stderr=open(h.root / "sshd.log", "wb"))  # noqa: SIM115
    deadline = time.monotonic() + 20
    while b"Server listening" not in (h.root / "sshd.log").read_bytes():
        if h.sshd.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sshd on {h.addr} did not start: "
                               f"{(h.root / 'sshd.log').read_text()}")
        time.sleep(0.05)


def remove(hosts: tuple[Host, ...]) -> None:
    for h in hosts:
        kill_vms(h.cbsd.workdir)
        if h.sshd is not None:
            h.sshd.terminate()
            h.sshd.wait(10)
        h.ns.delete()


# --- What the many-hosts suites do with two hosts


def joined(a: Host, b: Host) -> None:
    """b becomes node `b` of a (a trusts b's host key first)."""
    a.trust(b)
    a.cbsd("node", "mode=add", "name=b", f"host=root@{b.addr}").ok()


def moved(a: Host, b: Host) -> None:
    """The VM is registered on b only, with nothing left of it on a."""
    assert a.cbsd("bls", "header=0").ok().out == ""
    assert not (a.cbsd.workdir / "vm" / "vm1").exists()
    assert json.loads(b.cbsd("bls", "format=json").ok().out)[0]["jname"] == "vm1"


def stopped_at(cbsd: Cbsd, point: str, *args: str) -> subprocess.Popen[str]:
    """`cbsd ARGS` (in *cbsd*'s namespace) started and stopped at failpoint *point*."""
    env = {**cbsd.env, "CBSD_FAILPOINT": point}
    p = subprocess.Popen([*cbsd.prefix, sys.executable, "-m", "cbsd", *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc_state(_cbsd_pid(p)) != "T":
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    return p


def stopped_node_half(args: bytes, p: subprocess.Popen[str]) -> int:
    """The pid of the node's cbsd running `cbsd ARGS...` once it stopped at its failpoint
    (while *p*, the command on this side, still waits for it)."""
    deadline = time.monotonic() + 120
    while True:
        for pid in (int(x) for x in os.listdir("/proc") if x.isdigit()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"-m\x00cbsd\x00" + args in cmd and proc_state(pid) == "T":
                return pid
        assert time.monotonic() < deadline and p.poll() is None, "the node never stopped"
        time.sleep(0.02)


def node_half_killed(a: Host, b: Host, point: str, node_args: bytes, *command: str,
                     timeout: float = 120) -> tuple[int, str, str]:
    """`cbsd COMMAND` run on *a*, whose half on node *b* (the cbsd there whose arguments start
    with *node_args*) stops at failpoint *point* and is killed there with SIGKILL; the
    command's (exit code, stdout, stderr) once it has dealt with that. b's later logins run
    the plain cbsd again."""
    with b.cbsd_as(f"CBSD_FAILPOINT={point} {b.real_cbsd}"):
        p = a.cbsd.popen(*command)
        os.kill(stopped_node_half(node_args, p), signal.SIGKILL)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def kill_cbsd_running(args: bytes) -> None:
    """SIGKILL to every cbsd whose arguments start with *args* (a node's half, as if its host
    crashed)."""
    for pid in (int(x) for x in os.listdir("/proc") if x.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"-m\x00cbsd\x00" + args in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _cbsd_pid(p: subprocess.Popen[str]) -> int:
    """The cbsd process itself (under `ip netns exec`, which execs it: the same pid)."""
    return p.pid
