"""Listing many defined (stopped) VMs: `cbsd bls` vs `virsh list --all` with as many inactive
domains. The CLI must stay interactive."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench import peer_libvirt as lv
from bench.common import CBSD, Case, cbsd, workdir_env
from bench.timing import run as timed

PREFIX = "cbsd-bench-bls-"


def run(counts: tuple[int, ...] = (10, 200, 1000), repeat: int = 9) -> list[Case]:
    cases = []
    with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
        wd = Path(tmp)
        env = workdir_env(wd)
        defined = 0
        try:
            for n in counts:
                while defined < n:
                    defined += 1
                    cbsd("bcreate", f"jname=b{defined:04d}", "vm_os_type=other", "vm_ram=32m",
                         "imgsize=1m", env=env)
                    # Defined, never started: libvirt does not look at the disk until then.
                    lv.define(f"{PREFIX}{defined:04d}", wd / "none.qcow2", 32, wd / "none.log",
                              wd, replace=False)
                case = Case(f"bls, {n} VMs defined (CLI wall time)")
                cbsd("bls", env=env)  # warm the page cache
                for _ in range(repeat):
                    case.add("cbsd", timed([CBSD, "bls"], env))
                    case.add("virsh list --all", timed(["virsh", "-c", lv.URI, "list", "--all"]))
                cases.append(case)
        finally:
            for i in range(1, defined + 1):
                lv.virsh("undefine", f"{PREFIX}{i:04d}", check=False)
    return cases
