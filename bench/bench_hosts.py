"""Many hosts: bexport/bimport and bmove against the floor of moving the same bytes
(python -m bench.run hosts -> docs/benchmarks/hosts/: report.md, results.json).

One guest (1 GiB, 768 MiB random RAM, two checkpoints, vm_dedup=off so its files are plain)
on ext4. Export to a file is set against `cat` of the same files into one file (both
flushed); export piped into an import in a second workdir against `cat | cat` of the same
files; bmove between two hosts (network namespaces, each with its own sshd:
tests/guests/hosts.py) against `cat | ssh node 'cat > file'` of the same bytes; and the
downtime of moving the running guest: bmove (hibernate, move, resume: from the start of its
hibernation to the guest running there) and bmigrate (QEMU's own downtime plus the time until
the node has registered the VM and it runs), as cbsd reports them. Cases alternate within
each repetition; each starts from a quiet disk (timing.settle)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.guests.build import counter_image

from bench.bench_engine import cli
from bench.common import CBSD, Case, Study, report_header, workdir_env
from bench.guests import wait_counting
from bench.timing import settle

TYPE_CHECKING = False
if TYPE_CHECKING:
    from tests.guests.hosts import Host

RAM, FILL = "1g", 768
HOSTS = Study("hosts")


def _timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    settle()
    t = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def _sh(command: str, env: dict[str, str] | None = None) -> float:
    """A pipeline of the bench's own making (paths it created), timed like the rest."""
    return _timed(["sh", "-c", command], env)


def _files(wd: Path, name: str) -> list[Path]:
    files = [p for p in (wd / "vm" / name).iterdir() if p.is_file()]
    for ck in sorted((wd / "jails-system" / name / "checkpoints").glob("*.ckp")):
        files += sorted(p for p in ck.iterdir() if p.is_file())
    return files


def _guest(env: dict[str, str], wd: Path, name: str) -> Path:
    wd.mkdir(parents=True, exist_ok=True)
    img = counter_image(wd / f"{name}.raw", FILL)
    cli(env, "bcreate", f"jname={name}", f"image={img}", "vm_os_type=other", f"vm_ram={RAM}",
        "vm_dedup=off")
    img.unlink()
    cli(env, "bstart", name)
    log = wd / "jails-system" / name / "console.log"
    wait_counting(log, FILL, timeout=1800)
    for c in ("c1", "c2"):
        cli(env, "bcheckpoint", "mode=create", f"jname={name}", f"name={c}")
    return log


def pair_running_m(base: Path) -> tuple[Host, Host]:
    """Two test hosts in network namespaces, each the other's node, and on the first the
    benchmark's VM m running with its RAM filled (bench_migrate_ckp uses it too)."""
    # lazy: the tests' host helpers only for the runs that need two hosts
    from tests.guests import hosts as twohosts

    a, b = twohosts.make(base / "hosts")
    try:
        a.trust(b)
        b.trust(a)
        a.cbsd("node", "mode=add", "name=b", f"host=root@{b.addr}").ok()
        b.cbsd("node", "mode=add", "name=a", f"host=root@{a.addr}").ok()
        img = counter_image(base / "m.raw", FILL)
        a.cbsd("bcreate", "jname=m", f"image={img}", "vm_os_type=other", f"vm_ram={RAM}",
               "vm_dedup=off").ok()
        a.cbsd("bstart", "m").ok()
        wait_counting(a.cbsd.system("m") / "console.log", FILL, timeout=1800)
    except BaseException:
        twohosts.remove((a, b))
        raise
    return a, b


def run_all(repeat: int = 5) -> tuple[list[Case], dict[str, str]]:
    from tests.guests import hosts as twohosts

    base = Path(tempfile.mkdtemp(prefix="cbsd-bench-hosts-", dir="/var/tmp"))
    a_wd, b_wd = base / "a", base / "b"
    env = workdir_env(a_wd)
    _guest(env, a_wd, "v")
    cli(env, "bstop", "jname=v", "noacpi=1")
    files = _files(a_wd, "v")
    nbytes = sum(p.stat().st_size for p in files)
    cat_list = " ".join(str(p) for p in files)
    export, stream = Case("bexport to a file (same disk)"), \
        Case("bexport out=- | bimport in=- (another workdir, same disk)")
    move = Case("bmove of the stopped VM to another host (ssh over a veth pair)")
    down = Case("moving the running VM: downtime")
    live = Case("bmigrate of the running VM (disks mirrored, memory migrated)")
    env_b = workdir_env(b_wd)
    sys.stdout.flush()
    try:
        for _ in range(repeat):
            out = base / "x.cbsd"
            export.add("cbsd bexport", _timed([CBSD, "bexport", "jname=v", f"out={out}"], env))
            out.unlink()
            export.add("cat + fsync of the same files (floor)", _sh(
                f"cat {cat_list} > {out} && sync -f {out}"))
            out.unlink()
            stream.add("cbsd bexport out=- piped into cbsd bimport in=-", _sh(
                f"{CBSD} bexport jname=v out=- | CBSD_WORKDIR={b_wd} {CBSD} bimport in=-",
                env))
            subprocess.run([CBSD, "bremove", "jname=v"], env=env_b, check=True,
                           capture_output=True)
            stream.add("cat piped into cat, + fsync (floor)", _sh(
                f"cat {cat_list} | cat > {out} && sync -f {out}"))
            out.unlink()
        for c in (export, stream):
            c.notes.append(f"{nbytes / 2**20:.0f} MiB of files (disk + 2 checkpoints)")
        a, b = pair_running_m(base)
        try:
            for c in ("c1", "c2"):
                a.cbsd("bcheckpoint", "mode=create", "jname=m", f"name={c}").ok()
            a.cbsd("bstop", "m", "noacpi=1").ok()
            here, there = a, b
            for _ in range(repeat):
                src = " ".join(str(p) for p in _files(here.cbsd.workdir, "m"))
                floor = there.root / "floor.bin"
                ssh = (f"ssh -F {here.root / 'ssh_config'} root@{there.addr} "
                       f"'cat > {floor} && sync -f {floor} && rm {floor}'")
                move.add("cat piped into ssh cat, + fsync (floor)", _timed(
                    [*here.ns.prefix, "sh", "-c", f"cat {src} | {ssh}"]))
                settle()
                t = time.perf_counter()
                here.cbsd("bmove", "jname=m", f"node={there.name}", timeout=900).ok()
                move.add("cbsd bmove", time.perf_counter() - t)
                here, there = there, here
            here.cbsd("bstart", "m").ok()
            log = here.cbsd.system("m") / "console.log"
            wait_counting(log, FILL, timeout=600)
            for _ in range(repeat):
                settle()
                r = here.cbsd("bmove", "jname=m", f"node={there.name}", timeout=900).ok()
                m = re.search(r"downtime ([0-9.]+) s", r.out)
                assert m, r.out
                down.add("cbsd bmove (reported: hibernate .. running there)", float(m[1]))
                here, there = there, here
                time.sleep(2)
            here.cbsd("bcheckpoint", "mode=destroyall", "jname=m").ok()  # bmigrate: none
            for _ in range(repeat):
                settle()
                t = time.perf_counter()
                r = here.cbsd("bmigrate", "jname=m", f"node={there.name}", timeout=900).ok()
                live.add("cbsd bmigrate (whole command)", time.perf_counter() - t)
                m = re.search(r"downtime ([0-9]+) ms", r.out)
                assert m, r.out
                down.add("cbsd bmigrate (reported: QEMU's downtime + until running there)",
                         float(m[1]) / 1000)
                here, there = there, here
                time.sleep(2)
        finally:
            twohosts.remove((a, b))
        move.notes.append(f"{nbytes / 2**20:.0f} MiB of files; bmove also verifies them and "
                          "registers the VM there")
    finally:
        subprocess.run([CBSD, "bremove", "jname=v"], env=env, capture_output=True)
        subprocess.run(["rm", "-rf", str(base)], check=False)
    versions = {"ssh": subprocess.run(["ssh", "-V"], capture_output=True,
                                      text=True).stderr.strip()}
    return [export, stream, move, down, live], versions


def nbytes_of(c: Case) -> int | None:
    """The byte count a case's note records ("N MiB of files ...")."""
    for n in c.notes:
        m = re.match(r"(\d+) MiB of files", n)
        if m:
            return int(m[1]) << 20
    return None


def write(cases: list[Case], versions: dict[str, str], study: Study = HOSTS) -> str:

    study.save_results(cases, versions)
    lines = report_header("Many-hosts benchmarks", "hosts", "bench_hosts",
                          f"analysis in [analysis.md]({study.analysis('many-hosts')}).",
                          f"- {versions['ssh']}")
    for c in cases:
        lines += c.table()
        floor = [x for n, x in c.series.items() if "floor" in n]
        mine = [x for n, x in c.series.items() if "floor" not in n]
        if floor and mine and floor[0].median > 0:
            mib = (nbytes_of(c) or 0) / 2**20
            speed = f" ({mib / mine[0].median:.0f} vs {mib / floor[0].median:.0f} MiB/s)" \
                if mib else ""
            lines.append(f"- ratio cbsd / floor: **{mine[0].median / floor[0].median:.2f}x**"
                         f"{speed}")
        elif len(mine) == 2 and mine[1].median > 0:
            lines.append(f"- ratio: {mine[0].median / mine[1].median:.0f}x")
        lines += [f"- {n}" for n in c.notes] + [""]
    return study.publish(lines)


if __name__ == "__main__":
    print(write(*run_all(int(sys.argv[1]) if len(sys.argv) > 1 else 5)))
    os._exit(0)
