"""Measuring what a user sees: a command's wall time, and the time until the guest's console
shows new output (restore, resume) or the longest silence in it (live checkpoint)."""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
import time
from pathlib import Path


def settle(ram: int = 0) -> None:
    """Start every measurement from a quiet disk: the step before may have left hundreds of
    MiB dirty (virsh save does not flush) or a deletion running, and whichever command came
    next would pay for its writeback. Outside the timed span, for every tool alike.

    ram: bytes of anonymous memory the timed command will take (a restore's guest RAM), made
    ready first by back_memory, so that no series pays for what the step before it did."""
    os.sync()
    if ram:
        back_memory(ram)
    time.sleep(0.3)


def taken(fill_mib: int) -> int:
    """Bytes of anonymous memory a restore of a guest with *fill_mib* MiB of random RAM takes:
    its random RAM (a load leaves zero pages untouched) and QEMU's own (for settle's ram)."""
    return (fill_mib + 256) << 20


def back_memory(nbytes: int) -> None:
    """Take *nbytes* of anonymous memory in 2 MiB pages, touch it, and let it go.

    This host is a VM whose balloon has free page reporting: RAM left free for about two
    seconds is handed back to the hypervisor, and whoever takes it next pays the hypervisor's
    page faults (~450 MB/s here). A restore's QEMU allocating 1 GiB took 2.1-2.3 s after the
    host had been idle and 0.31 s right after another 1 GiB QEMU had exited, whatever the
    engine: the order of a bench's steps decided the result (docs/benchmarks/analysis.md, "Memory
    the host gave back"). Backed again just before, every series starts as on bare metal."""
    import mmap

    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)  # as QEMU takes guest RAM
        for offset in range(0, nbytes, mmap.PAGESIZE):
            m[offset] = 1
    finally:
        m.close()


def run(argv: list[str], env: dict[str, str] | None = None, ram: int = 0) -> float:
    settle(ram)
    t = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return dt


def until_output(argv: list[str], log: Path, env: dict[str, str] | None = None,
                 timeout: float = 120, ram: int = 0) -> float:
    """Wall time from starting *argv* until the guest writes to its console again (*ram*:
    see settle)."""
    settle(ram)
    size = log.stat().st_size if log.exists() else 0
    t = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return wait_output(log, size, t, timeout, f"after {' '.join(argv)}")


def wait_output(log: Path, size: int, since: float, timeout: float, what: str) -> float:
    """Until *log* grows past *size*; returns the seconds since perf_counter() was *since*."""
    while (log.stat().st_size if log.exists() else 0) <= size:
        if time.perf_counter() - since > timeout:
            raise RuntimeError(f"no guest output {what}")
        time.sleep(0.002)
    return time.perf_counter() - since


class GapWatch:
    """Records when the console grows; max_gap() is the longest silence in a time window."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.stamps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        size = self.log.stat().st_size
        while not self._stop.is_set():
            now = self.log.stat().st_size
            if now != size:
                size = now
                self.stamps.append(time.perf_counter())
            time.sleep(0.002)

    def __enter__(self) -> GapWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def max_gap(self, start: float, end: float) -> float:
        points = [start] + [s for s in self.stamps if start < s < end] + [end]
        after = [s for s in self.stamps if s >= end]
        if after:
            points[-1] = after[0]  # the silence lasts until the next output
        return max(b - a for a, b in itertools.pairwise(points))
