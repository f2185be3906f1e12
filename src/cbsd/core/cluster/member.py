"""The local etcd member: started detached (cbsd.detach) with TLS and client certificates
for clients and peers alike, its data in WORKDIR/cluster/etcd (0700), listening only on this
node's address (never a wildcard) and 127.0.0.1 -- both TLS-only."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from cbsd.core.cluster import config
from cbsd.core.cluster.config import CLIENT_PORT, Config
from cbsd.core.cluster.store import ClusterUnreachable, Store
from cbsd.detach import start_detached
from cbsd.errors import StateError
from cbsd.storage.atomic import write_atomic
from cbsd.storage.paths import Workdir


def argv(d: Path, cfg: Config, state: str) -> list[str]:
    tls = ["--cert-file", str(d / "node.crt"), "--key-file", str(d / "node.key"),
           "--trusted-ca-file", str(d / "ca.crt"), "--client-cert-auth",
           "--peer-cert-file", str(d / "node.crt"), "--peer-key-file", str(d / "node.key"),
           "--peer-trusted-ca-file", str(d / "ca.crt"), "--peer-client-cert-auth"]
    initial = ",".join(f"{n}={u}" for n, u in sorted(cfg.peers.items()))
    return ["etcd", "--name", cfg.node, "--data-dir", str(d / "etcd"),
            "--listen-client-urls", ",".join(dict.fromkeys(
                [cfg.client_url, f"https://127.0.0.1:{CLIENT_PORT}"])),
            "--advertise-client-urls", cfg.client_url,
            "--listen-peer-urls", cfg.peer_url,
            "--initial-advertise-peer-urls", cfg.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", state,
            "--initial-cluster-token", "cbsd", *tls,
            # A member back from a partition asks before it calls an election (raft's
            # pre-vote): without it, its raised term deposes a working leader, and the
            # cluster stalls for an election just as the partition heals (fencing and
            # failover, docs/cluster.md). Default in etcd 3.6; 3.4 and 3.5 have the flag.
            "--pre-vote",
            "--logger", "zap", "--log-outputs", str(d / "etcd.log")]


def pid_file(wd: Workdir) -> Path:
    return config.folder(wd) / "etcd.pid"


def start(wd: Workdir, cfg: Config, state: str) -> None:
    """Start the member (state: 'new' for the first, 'existing' for one added) unless it
    runs; wait until it serves (a joining member only once the cluster has a quorum)."""
    if running(wd):
        return
    d = config.folder(wd)
    (d / "etcd").mkdir(mode=0o700, exist_ok=True)
    try:
        proc = start_detached(argv(d, cfg, state))
    except OSError as e:
        raise StateError(f"cluster: cannot start etcd: {e.strerror} (is etcd-server "
                         "installed? scripts/setup.sh installs it)") from None
    write_atomic(pid_file(wd), str(proc.pid).encode())


def wait_serving(store: Store, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.prefix(config.PREFIX)
            return
        except ClusterUnreachable as e:
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] \
                    if log.exists() else []
                raise StateError(f"cluster: etcd does not answer: {e}"
                                 + (f" (its log: {tail[0][:300]})" if tail else "")) from None
        time.sleep(0.2)


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return None
    return pid if str(path.parent).encode() in cmd or b"cbsd" in cmd else None


def running(wd: Workdir) -> int | None:
    return _pid(pid_file(wd))


def stop(path: Path, timeout: float = 20.0) -> None:
    """End the process *path* names (this workdir's etcd or keeper) and wait for it."""
    pid = _pid(path)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.05)
    path.unlink(missing_ok=True)
