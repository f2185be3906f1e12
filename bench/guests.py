"""Benchmark guests: the boot-sector counter guest with N MiB of pseudo-random RAM."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.guests.build import counter_image

from bench.common import cbsd


def start_filled_vm(env: dict[str, str], workdir: Path, jname: str, ram: str,
                    fill_mib: int) -> Path:
    """Create and start a counter VM whose RAM holds *fill_mib* MiB of random data; returns
    its console log once the guest is past the fill and counting. Its checkpoints stay plain
    streams (vm_dedup=off): the data path virsh restore and QEMU alone take too, and what the
    floor reads (a fold would replace the stream; the engine bench measures the chunk store)."""
    img = counter_image(workdir / f"{jname}.raw", fill_mib)
    cbsd("bcreate", f"jname={jname}", f"image={img}", "vm_os_type=other", f"vm_ram={ram}",
         "vm_dedup=off", env=env)
    cbsd("bstart", f"jname={jname}", env=env)
    log = workdir / "jails-system" / jname / "console.log"
    wait_counting(log, fill_mib)
    return log


def wait_counting(log: Path, fill_mib: int, timeout: float = 600) -> None:
    """Until the guest behind *log* is past its RAM fill and printing its counter."""
    deadline = time.monotonic() + timeout
    while len(re.findall(rb"n=\d+", log.read_bytes() if log.exists() else b"")) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest writing {log} did not come up")
        time.sleep(0.2)
    if fill_mib and b"FILLED" not in log.read_bytes():
        raise RuntimeError(f"the guest writing {log} did not fill its RAM")
