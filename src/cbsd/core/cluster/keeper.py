"""The node's lease keeper: `python -m cbsd.core.cluster.keeper WORKDIR`, started detached by
`bcluster mode=init|join|start` (cbsd.detach). It stays a process of its own, not a part of
`cbsd serve`: a hung service must not stop the renewal nor the fencing. It grants
the node's lease (config ttl), writes /cbsd/alive/NODE under it and renews it every ttl/3
with the free memory now; a lease that lapsed anyway (etcd unreachable for a whole TTL) is
granted anew. Killed, it leaves the lease to lapse: the node shows down within ttl seconds.

Three threads, so that no call to etcd (each may hang for its timeout) delays another job:
- renewal: the lease, every ttl/3; it dates each success by when the request was sent;
- watch: one range read of /cbsd/ a second: which HA VMs this node owns (the fencing set),
  copies here of VMs another node took over killed (fence.stale_here), and the standby's
  takeovers (core/cluster/takeover.py, in child processes);
- the main thread's tick, five times a second: fencing (fence.fence_due: kill every HA VM's
  QEMU here before the lease can expire; a watchdog's timeout earlier with one) and the
  watchdog, petted only while a reboot one timeout later would still come before fencing
  is due, or every HA VM is fenced (fence.pet_safe).
Every fencing event is a line in WORKDIR/cluster/keeper.log."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cbsd.core.cluster import config, fence, hasched, nodes
from cbsd.core.cluster.store import ClusterUnreachable, Store
from cbsd.core.cluster.watchdog import Watchdog
from cbsd.core.vm.site import Site
from cbsd.storage.atomic import write_atomic
from cbsd.storage.paths import Workdir

TICK = 0.2  # seconds between fencing checks (well inside fence.margin)
NOT_STARTED = "not started: "  # a keeper.log line's start: why the keeper gave up at its start
WATCH = 1.0  # seconds between range reads of the cluster (the standby's reaction time)


class Keeper:
    """One node's keeper. *site*: makes a view of this node's VMs, one per thread (an
    SQLite connection serves the thread that opened it); None: a keeper with no VMs to fence,
    as in tests of the lease alone. *clock*: monotonic seconds; *on_snapshot*: what the
    watch round does with the cluster it read (the standby's takeovers)."""

    def __init__(self, store: Store, name: str, ttl: int,
                 site: Callable[[], Site] | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 watchdog: Watchdog | None = None,
                 on_snapshot: Callable[[nodes.Snapshot], None] | None = None,
                 log: Callable[[str], None] = lambda _msg: None,
                 watch_store: Store | None = None) -> None:
        self.store, self.name, self.ttl, self.make_site = store, name, ttl, site
        # the watch thread's own client: a client (its session, its endpoint order) serves
        # one thread
        self.watch_store = watch_store or store
        self._local = threading.local()
        self.clock, self.watchdog, self.on_snapshot, self.log = clock, watchdog, on_snapshot, log
        self.margin = fence.margin(ttl)
        self.lease = 0
        # Before its first renewal the keeper knows nothing of its lease (a keeper that was
        # down may have let it lapse): fencing is due until a renewal succeeds.
        self.last_ok = clock() - ttl
        self.records: dict[str, dict[str, Any]] = {}
        # the HA VMs this node owned at the last read; None until a read succeeds: then the
        # local definitions with ha=1 stand in (fence.local_ha), so a keeper restarted while
        # etcd is out of reach still fences
        self.fencing: set[str] | None = None

    @property
    def site(self) -> Site | None:
        if self.make_site is None:
            return None
        if getattr(self._local, "site", None) is None:
            self._local.site = self.make_site()
        return self._local.site  # type: ignore[no-any-return]

    def renew(self) -> bool:
        """One renewal: the lease kept alive (or granted anew if it lapsed) and the alive key
        written under it; only then does last_ok move, to when the request was sent."""
        sent = self.clock()
        try:
            if not self.lease or self.store.keepalive(self.lease) <= 0:
                self.lease = self.store.grant(self.ttl)
            nodes.beat(self.store, self.name, self.lease)
        except ClusterUnreachable:
            return False  # try again next round; past the TTL the lease is granted anew
        self.last_ok = max(self.last_ok, sent)
        return True

    def watch(self) -> None:
        """One read of the cluster: the fencing set, stale copies killed, takeovers."""
        snap = nodes.snapshot(self.watch_store)
        self.records = {j: kv.json() for j, kv in snap.vms.items()}
        self.fencing = fence.ha_owned(self.records, self.name)
        site = self.site
        if site is not None:
            local = site.inventory.names()
            moving = [j for j in local if site.workdir.moving(j).exists()]
            for j in fence.stale_here(self.records, self.name, local, moving,
                                      fence.local_ha(site)):
                if fence.kill(site, j):
                    self.log(f"killed {j}: its owner record names node "
                             f"{self.records[j].get('node')}")
        if self.on_snapshot is not None:
            self.on_snapshot(snap)

    def tick(self) -> bool:
        """The fencing check; whether this node is healthy (a watchdog's timeout from now,
        the lease is still fresh; or every HA VM here stopped) -- the watchdog is petted only
        then. With a watchdog fencing starts that timeout earlier (fence.pet_safe): a keeper
        that stops petting must have fenced already, or the host reboots."""
        now = self.clock()
        site = self.site
        timeout = self.watchdog.timeout if self.watchdog is not None else 0
        if fence.pet_safe(self.ttl, self.last_ok, now, timeout, self.margin) or site is None:
            healthy = True
        else:
            fencing = fence.local_ha(site) if self.fencing is None else self.fencing
            killed, left = fence.kill_all(site, fencing)
            for j in killed:
                self.log(f"fenced {j}: last renewal {now - self.last_ok:.2f} s ago "
                         f"(ttl {self.ttl} s)")
            for j in left:
                self.log(f"fencing {j} FAILED: its QEMU is still running")
            healthy = not left
        if healthy and self.watchdog is not None:
            self.watchdog.pet()
        return healthy

    def serve(self) -> None:
        """The keeper's life: renewal and watch threads, the tick in this one."""
        self.renew()
        for job, period in ((self.renew, self.ttl / 3), (self.watch, WATCH)):
            threading.Thread(target=_forever, args=(job, period, self.log), daemon=True).start()
        while True:
            try:
                self.tick()
            except Exception as e:  # logged, and the next tick tries again (no pet now)
                self.log(f"tick: {e.__class__.__name__}: {e}")
            time.sleep(TICK)


def _forever(job: Callable[[], object], period: float, log: Callable[[str], None]) -> None:
    while True:
        try:
            job()
        except ClusterUnreachable:
            pass
        except Exception as e:  # a surprise must not end the thread: the lease depends on it
            log(f"{getattr(job, '__name__', job)}: {e.__class__.__name__}: {e}")
        time.sleep(period)


def run(store: Store, name: str, ttl: int, rounds: int | None = None,
        sleep: float | None = None) -> None:
    """Renew the lease for *rounds* rounds (None: for ever), *sleep* s apart (ttl/3)."""
    k = Keeper(store, name, ttl)
    n = 0
    while rounds is None or n < rounds:
        n += 1
        k.renew()
        time.sleep(ttl / 3 if sleep is None else sleep)


def _logger(path: Path) -> Callable[[str], None]:
    def log(msg: str) -> None:
        config.append_log(path, f"{time.time():.3f} {msg}")  # capped, as hasched.log
    return log


def main() -> int:
    wd = Workdir(Path(sys.argv[1]))
    cfg = config.load(wd)
    if cfg is None:
        return 1
    # lazy: the keeper is the one process that needs VMs and takeovers next to the lease
    from cbsd.core.cluster import takeover
    from cbsd.core.vm.context import Context  # lazy: as above (the inventory, its SQLite)

    log = _logger(config.keeper_log(wd))
    try:
        dog = Watchdog(cfg.watchdog, cfg.ttl) if cfg.watchdog else None
    except OSError as e:  # busy (another watchdog daemon has it), denied, unfit
        log(f"{NOT_STARTED}{e}")
        return 1
    # the pid file says "started": bcluster waits for it (admin.start_keeper), so only now
    write_atomic(config.keeper_pid(wd), str(os.getpid()).encode())
    standby = takeover.Standby(wd, cfg.node, cfg.ttl, log)
    hasched.start(wd)  # periodic replication (docs/cluster.md "Replication"): its own thread
    if dog is not None:
        # stopped on purpose (bcluster mode=leave, or start with another watchdog=): the
        # magic close, so a stop that was asked for does not reboot the host
        def stop(*_: object) -> None:
            dog.disarm()
            os._exit(0)

        signal.signal(signal.SIGTERM, stop)
    Keeper(config.store(wd, cfg), cfg.node, cfg.ttl, lambda: Context(wd, writable=False),
           watchdog=dog,
           on_snapshot=standby.round, log=log, watch_store=config.store(wd, cfg)).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
