"""The node's lease keeper: `python -m cbsd.core.cluster.keeper WORKDIR`, started detached by
`bcluster mode=init|join` (cbsd.detach; `cbsd serve` is to take this over). It grants the
node's lease (config ttl), writes /cbsd/alive/NODE under it and renews it every ttl/3 with
the free memory now; a lease that lapsed anyway (etcd unreachable for a whole TTL) is granted
anew. Killed, it leaves the lease to lapse: the node shows down within ttl seconds."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cbsd.core.cluster import config, hasched, nodes
from cbsd.core.cluster.store import ClusterUnreachable, Store
from cbsd.storage.atomic import write_atomic
from cbsd.storage.paths import Workdir


def pid_file(wd: Workdir) -> Path:
    return config.folder(wd) / "keeper.pid"


def run(store: Store, name: str, ttl: int, rounds: int | None = None,
        sleep: float | None = None) -> None:
    lease = 0
    period = ttl / 3 if sleep is None else sleep
    n = 0
    while rounds is None or n < rounds:
        n += 1
        try:
            if not lease or store.keepalive(lease) <= 0:
                lease = store.grant(ttl)
            nodes.beat(store, name, lease)
        except ClusterUnreachable:
            pass  # try again next round; past the TTL the lease is gone and granted anew
        time.sleep(period)


def main() -> int:
    wd = Workdir(Path(sys.argv[1]))
    cfg = config.load(wd)
    if cfg is None:
        return 1
    write_atomic(pid_file(wd), str(os.getpid()).encode())
    hasched.start(wd)  # periodic replication (docs/cluster.md "Replication"): its own thread
    run(config.store(wd, cfg), cfg.node, cfg.ttl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
