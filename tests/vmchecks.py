"""What the integration tests judge a VM by, through the boot-sector counter guest (it prints
"n=COUNT disk=COUNT OK" several times a second and writes its count to its disk): checkpoints
made and restored with the count they hold, a guest that goes on counting with its disk
matching its memory, and what a command may not leave behind. The CLI runner these drive is
tests/harness.py."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.harness import COUNTER_RE, Cbsd, counter_lines


def last_count(cbsd: Cbsd, jname: str) -> int:
    """The last count the counter guest printed on its console."""
    return counter_lines(cbsd.console(jname).text())[-1][0]


def checkpoint(cbsd: Cbsd, jname: str, name: str, *extra: str) -> tuple[int, int]:
    """Create a checkpoint; returns (last count before, last count after) the command: the
    count frozen in the checkpoint lies between them."""
    before = last_count(cbsd, jname)
    r = cbsd("bcheckpoint", "mode=create", f"jname={jname}", f"name={name}", *extra).ok()
    path = cbsd.system(jname) / "checkpoints" / f"{name}.ckp"
    assert r.out.strip() == f"Checkpoint was created!: {path}"
    return before, last_count(cbsd, jname)


def restore(cbsd: Cbsd, jname: str, name: str, *extra: str) -> list[tuple[int, int, str]]:
    """Restore; returns the guest's first three lines after it. Fails on any sign of a boot."""
    con = cbsd.console(jname)
    mark = con.mark()
    r = cbsd("bstart", f"jname={jname}", f"checkpoint={name}", *extra).ok()
    assert r.out.strip().startswith(f"{jname}: restored from checkpoint {name}")
    con.wait(COUNTER_RE, since=mark, count=3)
    assert "BOOT" not in con.since(mark), "a restore must not reboot the guest"
    return counter_lines(con.since(mark))[:3]


def disk_tags(cbsd: Cbsd, jname: str) -> list[str]:
    """The internal snapshots of the VM's first disk (read with -U: QEMU may hold it)."""
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json",
                          str(cbsd.workdir / "vm" / jname / "dsk1.qcow2")],
                         capture_output=True, text=True, check=True).stdout
    return [s["name"] for s in json.loads(out).get("snapshots", [])]


def hidden_leftovers(cbsd: Cbsd, jname: str) -> list[str]:
    """Partial or retired states still on disk. Retired ones ('.del-') are removed by a
    detached process after the command returns: they get a few seconds to go."""
    deadline = time.monotonic() + 10
    while True:
        found = []
        for d in (cbsd.system(jname), cbsd.system(jname) / "checkpoints"):
            if d.is_dir():
                found += [p.name for p in d.iterdir() if ".ckp." in p.name]
        if not any(".del-" in f for f in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def assert_guest_fine(cbsd: Cbsd, jname: str) -> None:
    """The guest runs, counting, with its disk matching its memory."""
    con = cbsd.console(jname)
    mark = con.mark()
    con.wait(COUNTER_RE, since=mark, count=2)
    assert all(ok == "OK" for _, _, ok in counter_lines(con.since(mark)))


def restore_is_sound(cbsd: Cbsd, jname: str, name: str) -> None:
    """Restore checkpoint *name* (stopping the VM first): the guest continues without a
    boot, its disk matching its memory."""
    if cbsd.status(jname) != "Off":
        cbsd("bstop", jname, "noacpi=1").ok()
    con = cbsd.console(jname)
    mark = con.mark()
    cbsd("bstart", jname, f"checkpoint={name}").ok()
    con.wait(COUNTER_RE, since=mark, count=2)
    assert "BOOT" not in con.since(mark)
    assert all(ok == "OK" for _, _, ok in counter_lines(con.since(mark)))


def counting(cbsd: Cbsd, jname: str, count: int = 3) -> int:
    """Wait until the guest printed *count* more lines; its last counter value."""
    con = cbsd.console(jname)
    mark = len(con.text())
    con.wait(COUNTER_RE, since=mark, count=count)
    lines = counter_lines(con.since(mark))
    assert all(ok == "OK" for _, _, ok in lines), lines  # its disk matches its memory
    return lines[-1][0]


def first_after(cbsd: Cbsd, jname: str, mark: int) -> int:
    """The first count after console offset *mark* (once two lines, each OK, are there)."""
    con = cbsd.console(jname)
    con.wait(COUNTER_RE, since=mark, count=2)
    lines = counter_lines(con.since(mark))
    assert all(ok == "OK" for _, _, ok in lines), lines
    return lines[0][0]


def running_vm1(cbsd: Cbsd, image: Path) -> int:
    """vm1, the counter guest, running; its counter once it counts."""
    cbsd("bcreate", "jname=vm1", f"image={image}", "vm_os_type=other", "vm_ram=32m").ok()
    cbsd("bstart", "vm1").ok()
    return counting(cbsd, "vm1")


def vm_with_checkpoints(cbsd: Cbsd, image: Path, *names: str) -> dict[str, tuple[int, int]]:
    """vm1 running, with checkpoints *names*: the counter's range at each."""
    running_vm1(cbsd, image)
    marks = {}
    for name in names:
        before = counting(cbsd, "vm1")
        cbsd("bcheckpoint", "mode=create", "jname=vm1", f"name={name}").ok()
        marks[name] = (before, counting(cbsd, "vm1", 1))
    return marks


def restored_from(cbsd: Cbsd, jname: str, name: str, at: tuple[int, int]) -> None:
    """Restoring checkpoint *name* continues the counter from where it was saved: the first
    line after the restore is the saved count's next one (the mark counted as Console.since
    counts: a text-mode read turns each CR LF the guest prints into one character and put it
    lines early, on the old QEMU's last line)."""
    con = cbsd.console(jname)
    mark = con.mark()
    cbsd("bstart", jname, f"checkpoint={name}").ok()
    first = first_after(cbsd, jname, mark)
    assert "BOOT" not in con.since(mark), "a restore must not reboot the guest"
    assert at[0] <= first <= at[1] + 1, (first, at)
    cbsd("bstop", jname, "noacpi=1").ok()


def leftovers(cbsd: Cbsd) -> list[str]:
    """What a refused import may not leave: a VM's folders, or a staging folder."""
    wd = cbsd.workdir
    found = []
    for d in (wd / "vm", wd / "jails-system", wd / "var" / "tmp"):
        if d.is_dir():
            found += [str(p) for p in d.iterdir()]
    return found


def stored(cbsd: Cbsd) -> dict[str, str]:
    """Each checkpoint of vm1 and the form it is stored in (stream, chunks)."""
    return {str(d["name"]): str(d["stored"]) for d in cbsd.checkpoints("vm1")}


def wait_folded(cbsd: Cbsd, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while set(stored(cbsd).values()) != {"chunks"}:
        assert time.monotonic() < deadline, f"not folded in time: {stored(cbsd)}"
        time.sleep(0.2)
