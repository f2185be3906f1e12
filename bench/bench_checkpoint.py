"""Checkpoint create vs the hardware floor (dd of the same byte count + fdatasync, same disk),
and the size of an idle guest's checkpoint."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import Series, cbsd, workdir_env
from bench.guests import start_filled_vm


def dd_floor(path: Path, nbytes: int) -> float:
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={nbytes}",
                    "iflag=count_bytes", "conv=fdatasync"], check=True, capture_output=True)
    dt = time.perf_counter() - t
    path.unlink()
    return dt


def run(repeat: int = 5, base: Path | None = None) -> dict[str, object]:
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="cbsd-bench-ckp-", dir=base) as tmp:
        wd = Path(tmp)
        env = workdir_env(wd)
        start_filled_vm(env, wd, "big", "1g", 768)
        ck, floor = Series("cbsd bcheckpoint, 1 GiB guest / 768 MiB random RAM"), \
            Series("dd + fdatasync of the same bytes (floor)")
        size = 0
        for i in range(repeat):  # interleaved: A B A B ...
            ck.add(cbsd("bcheckpoint", "mode=create", "jname=big", f"name=b{i}", env=env))
            size = (wd / "jails-system/big/checkpoints" / f"b{i}.ckp" / "memory").stat().st_size
            cbsd("bcheckpoint", "mode=destroy", "jname=big", f"name=b{i}", env=env)
            floor.add(dd_floor(wd / "floor.bin", size))
        cbsd("bremove", "jname=big", env=env)
        out["checkpoint"] = (ck, floor, size)

        start_filled_vm(env, wd, "idle", "4g", 0)
        idle = Series("cbsd bcheckpoint, 4 GiB idle guest")
        sizes = []
        for i in range(repeat):
            idle.add(cbsd("bcheckpoint", "mode=create", "jname=idle", f"name=i{i}", env=env))
            sizes.append((wd / "jails-system/idle/checkpoints" / f"i{i}.ckp" / "memory")
                         .stat().st_size)
            cbsd("bcheckpoint", "mode=destroy", "jname=idle", f"name=i{i}", env=env)
        cbsd("bremove", "jname=idle", env=env)
        out["idle"] = (idle, max(sizes))
    return out


def report(res: dict[str, object]) -> str:
    ck, floor, size = res["checkpoint"]  # type: ignore[misc]
    idle, idle_size = res["idle"]  # type: ignore[misc]
    return "\n".join([
        "| case | median | min | max | runs |", "|---|---|---|---|---|",
        ck.row(), floor.row(), idle.row(), "",
        f"- checkpoint of 768 MiB random RAM: {size / 2**20:.0f} MiB written; "
        f"cbsd / dd floor = **{ck.median / floor.median:.2f}x** (target <= 1.25x)",
        f"- 4 GiB idle guest: checkpoint {idle_size / 2**20:.1f} MiB (target < 16 MiB)",
    ])


if __name__ == "__main__":
    print(report(run()))
