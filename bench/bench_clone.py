"""Many clones of one checkpoint at once: `bclone count=N start=1` (python -m bench.run clone
-> docs/benchmarks/clone/: report.md, results.json).

The guest is the busybox Linux test guest (tests/guests/linux_init.sh: a line on its console
every 0.5 s) with 128 MiB of RAM and a NIC on QEMU's user network, checkpointed once it runs.
For N = 1, 4 and 16 one command makes N clones of it with that checkpoint and starts them
together (parallel=N): each clone's restore also gives it a new generation ID and replaces
its NIC with one bearing its own MAC (core/checkpoint/identity.py), so the time includes the
guest ejecting its old card. Measured: the wall time from the command's start until the last
clone's console shows output after its restore; the command alone; and the host memory the N
running clones take: the drop of MemAvailable, and the sum of the QEMUs' PSS (pages shared
between them, such as QEMU's own code, counted once in total)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.guests.build import linux_guest
from tests.harness import qemu_processes

from bench.bench_engine import cli
from bench.common import CBSD, Case, Study, report_header, workdir_env
from bench.timing import settle

CLONE = Study("clone")
COUNTS = (1, 4, 16)
RAM = "128m"
CMDLINE = "console=ttyS0 loglevel=4 panic=-1"


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) << 10
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) << 10
    return 0


def _run_watching(argv: list[str], env: dict[str, str], logs: list[Path],
                  timeout: float = 600) -> tuple[float, float]:
    """Run *argv* while watching *logs*: (seconds from its start to the last log's first
    output, seconds the command took). The logs are watched while the command runs: a clone
    prints before the command has started the last one."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    first: dict[Path, float] = {}
    took = None
    while len(first) < len(logs) or took is None:
        now = time.perf_counter() - t
        for log in logs:
            if log not in first and log.exists() and log.stat().st_size > 0:
                first[log] = now
        if took is None and p.poll() is not None:
            took = now
            if p.returncode != 0:
                raise RuntimeError(f"{argv[1]} failed: {p.stderr.read() if p.stderr else ''}")
        if now > timeout:
            p.kill()
            raise RuntimeError(f"no output from {len(logs) - len(first)} clone(s)")
        time.sleep(0.005)
    return max(first.values()), took


def run_all(repeat: int = 3) -> tuple[list[Case], dict[str, str]]:
    base = Path(tempfile.mkdtemp(prefix="cbsd-bench-clone-"))
    wd = base / "wd"
    env = workdir_env(wd)
    kernel, initrd = linux_guest()
    cli(env, "bcreate", "jname=orig", f"kernel={kernel}", f"initrd={initrd}",
        f"cmdline={CMDLINE}", f"vm_ram={RAM}", "imgsize=16m")
    cli(env, "bstart", "orig")
    log = wd / "jails-system" / "orig" / "console.log"
    deadline = time.monotonic() + 300
    while b"tick n=2 " not in (log.read_bytes() if log.exists() else b""):
        if time.monotonic() > deadline:
            raise RuntimeError("the guest did not come up")
        time.sleep(0.2)
    cli(env, "bcheckpoint", "mode=create", "jname=orig", "name=c")
    cli(env, "bstop", "orig", "noacpi=1")
    last = Case("time to the last clone's first output (bclone count=N start=1)")
    command = Case("the bclone count=N start=1 command alone")
    avail = Case("host memory taken by the N running clones (MemAvailable drop)")
    pss = Case("host memory of the N clones' QEMUs (sum of PSS)")
    try:
        for _ in range(repeat):
            for n in COUNTS:
                settle()
                names = [f"c{i}" for i in range(1, n + 1)]
                logs = [wd / "jails-system" / j / "console.log" for j in names]
                before = _mem_available()
                out, took = _run_watching(
                    [CBSD, "bclone", "old=orig", "new=c%d", f"count={n}", "checkpoint=c",
                     "start=1", f"parallel={n}"], env, logs)
                last.add(f"N={n}", out)
                command.add(f"N={n}", took)
                pids = qemu_processes(wd)
                pss.add(f"N={n}", sum(map(_pss, pids)) / 2**20)
                avail.add(f"N={n}", (before - _mem_available()) / 2**20)
                for j in names:
                    cli(env, "bstop", j, "noacpi=1")
                    cli(env, "bremove", j)
        for c in (avail, pss):
            c.notes.append(f"MiB; each guest has {RAM} of RAM, all of it resident after its "
                           "restore (on ext4: each clone's RAM is its own anonymous memory), "
                           "plus QEMU's own")
        last.notes.append("from the command's start (copies made, then all started at "
                          "once); the consoles are watched while it runs")
        command.notes.append("it returns once every clone runs with its new NIC (the guest "
                             "ejected the old card and the new one is in)")
    finally:
        subprocess.run([CBSD, "bstop", "orig", "noacpi=1"], env=env, capture_output=True,
                       check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)
    qemu = subprocess.run([os.environ.get("CBSD_QEMU", "qemu-system-x86_64"), "--version"],
                          capture_output=True, text=True).stdout.splitlines()[0]
    return [last, command, avail, pss], {"qemu": qemu}


def write(cases: list[Case], versions: dict[str, str], study: Study = CLONE) -> str:
    study.save_results(cases, versions)
    lines = report_header("Many clones of one checkpoint", "clone", "bench_clone",
                          f"analysis in [analysis.md]({study.analysis('many-clones')}).",
                          f"- run with {versions['qemu']}")
    for c in cases:
        lines += c.table("MiB" if "memory" in c.title else "s")
        one = c.series.get("N=1")
        if one is not None and one.median > 0 and "time" in c.title:
            lines.append("- against N=1: " + ", ".join(
                f"{n} {s.median / one.median:.2f}x" for n, s in c.series.items()))
        lines += [f"- {n}" for n in c.notes] + [""]
    return study.publish(lines)


if __name__ == "__main__":
    print(write(*run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
    os._exit(0)
