"""This node's part of the cluster: WORKDIR/cluster/ (0700) holds config.json (this node's
name and address, the etcd endpoints it talks to, whether it runs a member), the cluster CA's
certificate, this node's certificate and key (the CA's key only on the node that made it),
and the local member's data, log and pid files. No config.json: the SSH-only mode."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cbsd.core.cluster.store import EtcdStore, Store
from cbsd.errors import StateError
from cbsd.storage.atomic import write_atomic
from cbsd.storage.paths import Workdir

PREFIX = "/cbsd/"
CLIENT_PORT = 2379
PEER_PORT = 2380


@dataclass
class Config:
    node: str
    address: str
    endpoints: list[str]
    member: bool
    ttl: int = 10  # the node lease, seconds: a node is down this long after its keeper stops
    peers: dict[str, str] = field(default_factory=dict)  # member name -> peer URL
    watchdog: str = ""  # the watchdog device the keeper pets ("": none; core/cluster/watchdog)

    @property
    def client_url(self) -> str:
        return f"https://{self.address}:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.address}:{PEER_PORT}"


LOG_MAX = 1 << 20  # the cluster's logs (hasched.log, keeper.log): bytes kept at most


def folder(wd: Workdir) -> Path:
    return wd.cluster_config.parent


def keeper_pid(wd: Workdir) -> Path:
    return folder(wd) / "keeper.pid"


def keeper_log(wd: Workdir) -> Path:
    """The keeper's and the takeovers' events (fencing, kills, takeovers), one per line."""
    return folder(wd) / "keeper.log"


def append_log(path: Path, line: str, cap: int = LOG_MAX) -> None:
    """*line* appended to the log *path*, which is kept under *cap* bytes (past it, the older
    half is dropped). A log that cannot be written is skipped: what it records matters more."""
    try:
        if path.exists() and path.stat().st_size > cap:
            kept = path.read_bytes()[-cap // 2:]
            path.write_bytes(kept[kept.find(b"\n") + 1:])
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass


def path(wd: Workdir) -> Path:
    return wd.cluster_config


def configured(wd: Workdir) -> bool:
    return path(wd).is_file()


def load(wd: Workdir) -> Config | None:
    try:
        raw: Any = json.loads(path(wd).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StateError(f"cluster: cannot read {path(wd)}: {e}") from None
    return Config(**raw)


def save(wd: Workdir, cfg: Config) -> None:
    write_atomic(path(wd), json.dumps(asdict(cfg), indent=1).encode())


def store(wd: Workdir, cfg: Config) -> Store:
    d = folder(wd)
    return EtcdStore(list(cfg.endpoints), str(d / "ca.crt"), str(d / "node.crt"),
                     str(d / "node.key"))
