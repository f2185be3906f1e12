"""The periodic replication (docs/cluster.md "Replication"): on each node, a thread of the
lease keeper (core/cluster/keeper.py calls start()) that, every TICK, replicates each of this
node's running VMs with ha=1 whose ha_interval has passed since its last replication began.

Each replication is a child process -- the real CLI, `cbsd bcheckpoint mode=replicate
jname=X`, with its lock, ownership guard and recovery -- so a slow or stuck replication never
delays the keeper's lease renewal, and two never run at once for one VM (a VM whose child
still runs is not due). A VM another command holds (exit 75, busy) is tried again at the next
tick; any other outcome waits a whole interval. Each outcome is one line in
WORKDIR/cluster/hasched.log (kept under config.LOG_MAX bytes: the older half is dropped)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cbsd.core.cluster import config
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import CbsdError
from cbsd.names import parse_interval
from cbsd.storage.paths import Workdir

TICK = 1.0
BUSY = 75


def log_path(wd: Workdir) -> Path:
    return config.folder(wd) / "hasched.log"


def due_vms(wd: Workdir) -> dict[str, int]:
    """This node's VMs with ha=1 whose QEMU runs: name -> interval (seconds)."""
    ctx = Context(wd, writable=False)
    out = {}
    for _, spec, _, _ in ctx.inventory.all():
        if isinstance(spec, Exception) or not (spec.ha and spec.ha_node):
            continue  # a damaged entry is bls's and the next command's to report
        try:
            if VM.load(ctx, spec.jname).alive():
                out[spec.jname] = parse_interval(spec.ha_interval, "ha_interval")
        except CbsdError:
            continue
    return out


def spawn(wd: Workdir, jname: str) -> subprocess.Popen[bytes]:
    """One replication: the CLI in a child process (its own session: a signal to the
    keeper's group does not cut it short half-way; it is made to be cut short anyway)."""
    src = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "CBSD_WORKDIR": str(wd.root),
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "cbsd", "bcheckpoint", "mode=replicate",
                             f"jname={jname}"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


@dataclass
class Loop:
    """The schedule's state; tick() is one round (unit-tested with fakes)."""
    wd: Workdir
    vms: Callable[[Workdir], dict[str, int]] = due_vms
    start: Callable[[Workdir, str], subprocess.Popen[bytes]] = spawn
    clock: Callable[[], float] = time.monotonic
    last: dict[str, float] = field(default_factory=dict)  # when each VM's last one began
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def tick(self) -> list[str]:
        """Reap finished children, start the due ones; the names started."""
        now = self.clock()
        for jname, child in list(self.running.items()):
            if child.poll() is None:
                continue
            del self.running[jname]
            out, err = child.communicate()
            self._log(jname, child.returncode, out, err)
            if child.returncode == BUSY:
                self.last.pop(jname, None)  # another command held it: due again now
        started = []
        for jname, interval in sorted(self.vms(self.wd).items()):
            if jname in self.running or now - self.last.get(jname, -1e18) < interval:
                continue
            self.last[jname] = now
            self.running[jname] = self.start(self.wd, jname)
            started.append(jname)
        return started

    def _log(self, jname: str, code: int, out: bytes, err: bytes) -> None:
        text = (err if code else out).decode(errors="replace").strip().splitlines()
        line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {jname} exit {code}: "
                f"{text[-1] if text else ''}")
        config.append_log(log_path(self.wd), line)  # a full disk: the outcome matters


def run(wd: Workdir, stop: threading.Event) -> None:
    loop = Loop(wd)
    while not stop.is_set():
        # The loop outlives one bad round (a damaged inventory being repaired, a full
        # disk): the next tick tries again.
        with contextlib.suppress(Exception):
            loop.tick()
        stop.wait(TICK)


def start(wd: Workdir) -> threading.Event:
    """The loop in a daemon thread of the calling process (the keeper); set the returned
    event to stop it."""
    stop = threading.Event()
    threading.Thread(target=run, args=(wd, stop), name="cbsd-hasched", daemon=True).start()
    return stop
