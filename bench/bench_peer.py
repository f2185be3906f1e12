"""cbsd vs libvirt (virsh) vs the hardware floor, on the same QEMU, guest and disk, in one run.

Every case alternates cbsd and libvirt (A B A B ...) on twin guests: the boot-sector counter
guest with N MiB of pseudo-random RAM, one defined in cbsd, one in libvirt."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.guests.build import counter_image

from bench import peer_libvirt as lv
from bench.common import CBSD, Case, machine, workdir_env
from bench.floor_restore import qemu_alone
from bench.guests import start_filled_vm, wait_counting
from bench.timing import GapWatch, run, taken, until_output


@dataclass
class Twins:
    """One guest under cbsd and its twin under libvirt."""

    wd: Path
    env: dict[str, str]
    name: str
    ram: str
    fill: int

    def __post_init__(self) -> None:
        self.cbsd_log = start_filled_vm(self.env, self.wd, self.name, self.ram, self.fill)
        disk = self.wd / f"lv-{self.name}.qcow2"
        raw = counter_image(self.wd / f"lv-{self.name}.raw", self.fill)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True)
        raw.unlink()
        self.dom = f"cbsd-bench-{self.name}"
        self.lv_log = self.wd / f"lv-{self.name}.console.log"
        ram_mib = int(self.ram[:-1]) * (1024 if self.ram.endswith("g") else 1)
        lv.define(self.dom, disk, ram_mib, self.lv_log, self.wd)
        lv.virsh("start", self.dom)
        wait_counting(self.lv_log, self.fill)

    def cbsd(self, *args: str) -> list[str]:
        return [CBSD, *args]

    @property
    def taken(self) -> int:
        return taken(self.fill)

    def close(self) -> None:
        lv.undefine(self.dom)
        subprocess.run([CBSD, "bremove", f"jname={self.name}"], env=self.env,
                       capture_output=True)


def dd_floor(path: Path, nbytes: int, direct: bool = False) -> float:
    """The issue's floor: dd of the same bytes + fdatasync. direct=True: O_DIRECT, the raw
    disk speed with no page cache at all (a stricter floor)."""
    flags = ["oflag=direct"] if direct else ["conv=fdatasync"]
    t = run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={nbytes}", "iflag=count_bytes",
             *flags])
    path.unlink()
    return t


QEMU_ALONE = "QEMU alone: start + load, no checks (floor)"


def save_restore(t: Twins, repeat: int, label: str) -> tuple[Case, Case]:
    """Checkpoint create vs virsh save (+ --bypass-cache) vs dd; restore vs virsh restore."""
    create = Case(f"checkpoint create, {label}")
    restore = Case(f"restore to first guest output, {label}")
    ck_dir = t.wd / "jails-system" / t.name / "checkpoints"
    sizes: dict[str, int] = {}
    for i in range(repeat):
        create.add("cbsd", run(t.cbsd("bcheckpoint", "mode=create", f"jname={t.name}",
                                      "name=b"), t.env))
        sizes["cbsd"] = (ck_dir / "b.ckp" / "memory").stat().st_size
        for variant, extra in (("virsh save", []), ("virsh save --bypass-cache",
                                                     ["--bypass-cache"])):
            img = t.wd / "lv-save.img"
            create.add(variant, run(["virsh", "-c", lv.URI, "save", t.dom, str(img), *extra]))
            sizes[variant] = img.stat().st_size
            restore.add("virsh restore" + (" --bypass-cache" if extra else ""), until_output(
                ["virsh", "-c", lv.URI, "restore", str(img), *extra], t.lv_log, ram=t.taken))
            img.unlink()
        _internal_snapshot(t, i, create, restore, sizes)
        create.add("dd + fdatasync (floor)", dd_floor(t.wd / "floor.bin", sizes["cbsd"]))
        create.add("dd oflag=direct (raw disk)", dd_floor(t.wd / "floor.bin", sizes["cbsd"],
                                                          direct=True))
        run(t.cbsd("bstop", f"jname={t.name}", "noacpi=1"), t.env)
        restore.add(QEMU_ALONE, qemu_alone(t.wd, t.name, "b", t.cbsd_log, ram=t.taken))
        restore.add("cbsd", until_output(t.cbsd("bstart", f"jname={t.name}", "checkpoint=b"),
                                         t.cbsd_log, t.env, ram=t.taken))
        run(t.cbsd("bcheckpoint", "mode=destroy", f"jname={t.name}", "name=b"), t.env)
        del i
    create.notes.append("file sizes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB"
                                                    for k, v in sizes.items()))
    return create, restore


def _internal_snapshot(t: Twins, i: int, create: Case, restore: Case,
                       sizes: dict[str, int]) -> None:
    """libvirt's own checkpoint of a running domain: `snapshot-create-as` (libvirt 9.0 keeps
    memory and disk inside the qcow2, QEMU's savevm), and `snapshot-revert` of the shut-off
    domain to it. (External snapshots with --memspec cannot be reverted before libvirt 9.7.)"""
    name = f"b{i}"
    try:
        create.add("virsh snapshot-create-as", run(["virsh", "-c", lv.URI, "snapshot-create-as",
                                                    t.dom, name]))
        sizes["virsh snapshot-create-as (vmstate in the qcow2)"] = _vmstate_size(t, name)
        lv.virsh("destroy", t.dom)
        restore.add("virsh snapshot-revert", until_output(
            ["virsh", "-c", lv.URI, "snapshot-revert", t.dom, name], t.lv_log, ram=t.taken))
    except RuntimeError as err:
        if not any("snapshot" in n for n in create.notes):
            create.notes.append(f"virsh snapshot-create-as/revert failed here: {err}")
    finally:
        lv.virsh("snapshot-delete", t.dom, name, check=False)
        if lv.virsh("domstate", t.dom, check=False).strip() != "running":
            lv.virsh("start", t.dom, check=False)


def _vmstate_size(t: Twins, tag: str) -> int:
    """The memory an internal snapshot stores inside the qcow2 (the image's file size says
    little: clusters freed by an earlier snapshot-delete are reused)."""
    import json

    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--force-share", "--output=json", str(t.wd / f"lv-{t.name}.qcow2")],
        capture_output=True, text=True, check=True).stdout)
    return next(int(s["vm-state-size"]) for s in info.get("snapshots", []) if s["name"] == tag)


def hibernate(t: Twins, repeat: int, label: str) -> tuple[Case, Case]:
    down = Case(f"hibernate, {label}")
    up = Case(f"resume to first guest output, {label}")
    image = t.wd / "jails-system" / t.name / "hibernate.ckp" / "memory"
    for _ in range(repeat):
        down.add("cbsd", run(t.cbsd("bsuspend", f"jname={t.name}"), t.env))
        down.add("dd oflag=direct (raw disk)", dd_floor(t.wd / "floor.bin", image.stat().st_size,
                                                        direct=True))
        down.add("virsh managedsave", run(["virsh", "-c", lv.URI, "managedsave", t.dom]))
        up.add("cbsd", until_output(t.cbsd("bstart", f"jname={t.name}"), t.cbsd_log, t.env,
                                    ram=t.taken))
        up.add("virsh start", until_output(["virsh", "-c", lv.URI, "start", t.dom], t.lv_log,
                                           ram=t.taken))
    return down, up


# The floors under `cbsd bpause` for a Python CLI, started as cbsd's launcher starts it (-I -S):
# the bare interpreter, and the interpreter plus the standard library the full command path
# imports -- what bpause's quick lane (cbsd/core/vm/pause.py) exists to avoid.
STDLIB = ("import os, re, json, socket, sqlite3, fcntl, pathlib, dataclasses, enum, typing, "
          "subprocess, shutil, contextlib, functools")
PYTHON_START = "python start, -I -S (no work)"


def pause(t: Twins, repeat: int) -> tuple[Case, Case]:
    on, off = Case("pause (CLI wall time)"), Case("resume from pause (CLI wall time)")
    python = str(Path(CBSD).parent / "python")
    for _ in range(repeat):
        on.add(PYTHON_START, run([python, "-IS", "-c", "pass"]))
        on.add("python -I -S + the stdlib of cbsd's full command path (no work)",
               run([python, "-IS", "-c", STDLIB]))
        on.add("cbsd", run(t.cbsd("bpause", f"jname={t.name}", "mode=on"), t.env))
        off.add("cbsd", run(t.cbsd("bpause", f"jname={t.name}", "mode=off"), t.env))
        # A mask (matching the same VM) is not for the quick lane: the full command's time.
        on.add("cbsd, full command path (jname=MASK)",
               run(t.cbsd("bpause", f"jname={t.name}*", "mode=on"), t.env))
        off.add("cbsd, full command path (jname=MASK)",
               run(t.cbsd("bpause", f"jname={t.name}*", "mode=off"), t.env))
        on.add("virsh suspend", run(["virsh", "-c", lv.URI, "suspend", t.dom]))
        off.add("virsh resume", run(["virsh", "-c", lv.URI, "resume", t.dom]))
    return on, off


def live_gap(t: Twins, repeat: int, label: str) -> Case:
    """The longest time the guest printed nothing around a live checkpoint (it prints every
    ~110 ms when undisturbed)."""
    case = Case(f"live checkpoint: longest guest output gap, {label}")
    for i in range(repeat):
        with GapWatch(t.cbsd_log) as w:
            time.sleep(0.5)
            s = time.perf_counter()
            run(t.cbsd("bcheckpoint", "mode=create", f"jname={t.name}", "name=l", "live=1"),
                t.env)
            e = time.perf_counter()
            time.sleep(0.5)
            base = w.max_gap(s - 0.5, s)
        case.add("cbsd live=1", w.max_gap(s, e))
        case.add("no checkpoint (baseline)", base)
        run(t.cbsd("bcheckpoint", "mode=destroy", f"jname={t.name}", "name=l"), t.env)
        ov = t.wd / f"lv-ov{i}.qcow2"
        mem = t.wd / f"lv-mem{i}"
        try:
            with GapWatch(t.lv_log) as w:
                time.sleep(0.5)
                s = time.perf_counter()
                run(["virsh", "-c", lv.URI, "snapshot-create-as", t.dom, f"s{i}", "--live",
                     "--no-metadata", "--memspec", f"file={mem},snapshot=external",
                     "--diskspec", f"hda,snapshot=external,file={ov}"])
                e = time.perf_counter()
                time.sleep(0.5)
            case.add("virsh snapshot-create-as --live", w.max_gap(s, e))
        except RuntimeError as err:
            if not case.notes:
                case.notes.append(f"virsh snapshot-create-as --live failed here: {err}")
        mem.unlink(missing_ok=True)
    return case


# --- the whole run --------------------------------------------------------------------------

def run_all(repeat: int = 9, big: bool = True) -> tuple[list[Case], dict[str, str]]:
    """*repeat* runs of each 1 GiB case (the targets; this shared machine varies a lot between
    runs, so more than the minimum of 5), 5 of the 4 GiB ones."""
    import tempfile

    # The machine is recorded with the results: a re-render (bench.run report) shows it, not
    # the machine the re-render happens on.
    versions = {"libvirt": lv.ensure(), "machine": "\n".join(machine())}
    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="cbsd-bench-peer-", dir="/var/tmp") as tmp:
        wd = Path(tmp)
        env = workdir_env(wd)
        t = Twins(wd, env, "g1", "1g", 768)
        try:
            cases += save_restore(t, repeat, "1 GiB guest / 768 MiB random RAM")
            cases += hibernate(t, repeat, "1 GiB / 768 MiB")
            cases += pause(t, repeat)
            cases.append(live_gap(t, repeat, "1 GiB / 768 MiB"))
        finally:
            t.close()
        if big:
            t = Twins(wd, env, "g4", "4g", 3000)
            try:
                cases += save_restore(t, 5, "4 GiB guest / 3000 MiB random RAM")
            finally:
                t.close()
        t = Twins(wd, env, "idle", "4g", 0)
        try:
            cases.append(save_restore(t, 5, "4 GiB idle guest")[0])
        finally:
            t.close()
    from bench import bench_bls

    cases += bench_bls.run(repeat=repeat)
    return cases, versions
