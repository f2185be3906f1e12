"""`cbsd bls` with many defined (stopped) VMs: the CLI must stay interactive."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import Series, cbsd, workdir_env


def run(counts: tuple[int, ...] = (10, 200), repeat: int = 7) -> list[Series]:
    results = []
    with tempfile.TemporaryDirectory(prefix="cbsd-bench-bls-") as tmp:
        env = workdir_env(Path(tmp))
        defined = 0
        for n in counts:
            while defined < n:
                defined += 1
                cbsd("bcreate", f"jname=b{defined:04d}", "vm_os_type=other", "vm_ram=32m",
                     "imgsize=1m", env=env)
            s = Series(f"bls, {n} VMs defined")
            cbsd("bls", env=env)  # warm the page cache
            for _ in range(repeat):
                s.add(cbsd("bls", env=env))
            results.append(s)
    return results


if __name__ == "__main__":
    for s in run():
        print(s.row())
