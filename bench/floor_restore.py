"""The floor under a restore: QEMU alone, started with the VM's own command line, loading the
checkpoint's memory file and running on -- what any manager driving this QEMU has to wait for.
None of cbsd's work is in it: no locking, no compatibility or integrity check, no disk revert
(the guest may find its disk ahead of its memory; only the time to its first output counts).
Timed from the bench's own process, so not even a Python start is included."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.timing import settle, wait_output
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.qemu import process
from cbsd.qemu.qmp import Monitor
from cbsd.storage.paths import Workdir


def qemu_alone(wd: Path, jname: str, checkpoint: str, console_log: Path, ram: int = 0
               ) -> float:
    """Seconds from launching QEMU until the restored guest prints. The VM must be Off.
    *ram*: see timing.settle."""
    vm = VM.load(Context(Workdir(wd)), jname)
    argv = vm.argv(incoming=True)
    memory = wd / "jails-system" / jname / "checkpoints" / f"{checkpoint}.ckp" / "memory"
    for sock in (vm.paths.qmp_sock, vm.paths.console_sock):
        Path(sock).unlink(missing_ok=True)
    settle(ram)
    size = console_log.stat().st_size
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)  # -daemonize: back once QEMU is set up
    pid = int(Path(vm.paths.pidfile).read_text())
    fd = os.open(memory, os.O_RDONLY)
    total = os.fstat(fd).st_size
    try:
        with Monitor(vm.paths.qmp_sock, jname, timeout=120) as mon:
            mon.send_fd(fd, "floor")
            mon.cmd("migrate-incoming", uri="fd:floor")
            # Until QEMU has read the whole file (it shares our file offset), then until it
            # leaves 'inmigrate': a `cont` sent before that is lost. Polling the offset, not
            # QMP, during the load: QMP requests would compete with the load for QEMU's loop.
            while os.lseek(fd, 0, os.SEEK_CUR) < total:
                time.sleep(0.002)
            while mon.status() == "inmigrate":
                time.sleep(0.002)
            mon.cmd("cont")
        return wait_output(console_log, size, t, 120, "after the floor restore")
    finally:
        os.close(fd)
        process.kill(pid, vm.paths.qmp_sock, 9)
        process.wait_gone(pid, vm.paths.qmp_sock, 30)
