"""bsuspend: hibernation frees the VM's process; bstart resumes it where it was."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import COUNTER_RE, TICK_RE, Cbsd, counter_lines, create_linux, proc_alive

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]


def hibernate(cbsd: Cbsd, jname: str) -> int:
    """Hibernate; returns the last count the guest printed (its console is frozen after)."""
    pid = cbsd.pid(jname)
    assert cbsd("bsuspend", f"jname={jname}").ok().out.strip() == f"{jname}: hibernated"
    assert cbsd.status(jname) == "Suspended"
    assert cbsd.bls(jname)[0]["jid"] == 0
    assert not proc_alive(pid), "hibernation ends QEMU and frees its memory"
    return counter_lines(cbsd.console(jname).text())[-1][0]


def resume(cbsd: Cbsd, jname: str, *extra: str) -> list[tuple[int, int, str]]:
    con = cbsd.console(jname)
    mark = con.mark()
    r = cbsd("bstart", f"jname={jname}", *extra).ok()
    assert r.out.strip().startswith(f"{jname}: resumed from hibernation")
    if "paused=1" in extra:
        return []
    con.wait(COUNTER_RE, since=mark, count=3)
    assert "BOOT" not in con.since(mark), "resume must not reboot"
    return counter_lines(con.since(mark))


def test_hibernate_and_resume(cbsd: Cbsd, running_counter: str) -> None:
    last = hibernate(cbsd, "vm1")
    image = cbsd.system("vm1") / "hibernate.ckp"
    assert image.is_dir() and os.stat(image / "memory").st_mode & 0o077 == 0
    m = json.loads((image / "manifest.json").read_text())
    # QEMU 9+ (probed): mapped-ram + multifd, unless guest RAM is a file (then RAM is cloned)
    mapped = int(m["qemu_version"].split(".")[0]) >= 9 and "ram" not in m["files"]
    assert (m["migration"].get("capabilities") == ["mapped-ram", "multifd"]) is mapped, m
    lines = resume(cbsd, "vm1")
    assert lines[0][0] == last + 1, (last, lines[:2])
    assert all(ok == "OK" for _, _, ok in lines), "disk matches memory after resume"
    assert cbsd.status("vm1") == "On"
    assert not image.exists(), "the image is removed once the VM runs again"
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json",
                           str(cbsd.workdir / "vm/vm1/dsk1.qcow2")], capture_output=True,
                          text=True, check=True).stdout
    assert json.loads(info).get("snapshots", []) == [], "its disk snapshot is released too"


def test_resume_paused(cbsd: Cbsd, running_counter: str) -> None:
    hibernate(cbsd, "vm1")
    resume(cbsd, "vm1", "paused=1")
    assert cbsd.status("vm1") == "Paused"


def test_bstop_refuses_to_drop_the_state_and_discard_boots_cold(cbsd: Cbsd,
                                                               running_counter: str) -> None:
    hibernate(cbsd, "vm1")
    r = cbsd("bstop", "vm1")
    assert r.code == 1 and "bsuspend mode=discard" in r.err
    assert cbsd.status("vm1") == "Suspended"
    r = cbsd("bsuspend", "vm1", "mode=discard").ok()
    assert r.out.strip() == "vm1: hibernation image discarded"
    assert cbsd.status("vm1") == "Off"
    assert not (cbsd.system("vm1") / "hibernate.ckp").exists()
    con = cbsd.console("vm1")
    mark = con.mark()
    assert cbsd("bstart", "vm1").ok().out.strip() == "vm1: started"
    con.wait(r"BOOT disk=\d+", since=mark)


def test_failed_resume_keeps_the_image(cbsd: Cbsd, running_counter: str) -> None:
    hibernate(cbsd, "vm1")
    mem = cbsd.system("vm1") / "hibernate.ckp" / "memory"
    data = bytearray(mem.read_bytes())
    data[100] ^= 0x10
    mem.write_bytes(data)
    r = cbsd("bstart", "vm1")
    assert r.code == 1 and "hibernation image is damaged: memory checksum mismatch" in r.err
    assert cbsd.status("vm1") == "Suspended"
    assert mem.exists()
    data[100] ^= 0x10
    mem.write_bytes(data)  # repaired: now it resumes
    assert all(ok == "OK" for _, _, ok in resume(cbsd, "vm1"))


def test_checkpoints_survive_hibernation(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    hibernate(cbsd, "vm1")
    resume(cbsd, "vm1")
    cbsd("bstop", "vm1", "noacpi=1").ok()
    con = cbsd.console("vm1")
    mark = con.mark()
    cbsd("bstart", "vm1", "checkpoint=c").ok()
    con.wait(COUNTER_RE, since=mark, count=2)
    assert all(ok == "OK" for _, _, ok in counter_lines(con.since(mark)))


def _guests_script(cbsd: Cbsd, action: str) -> subprocess.CompletedProcess[str]:
    env = {**cbsd.env, "CBSD_GUESTS_CONFIG": "/nonexistent",
           "CBSD": str(Path(sys.executable).parent / "cbsd")}
    return subprocess.run([str(ROOT / "contrib" / "cbsd-guests"), action], env=env,
                          capture_output=True, text=True, timeout=300)


def test_host_shutdown_and_boot_bring_all_back(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    img = counter_image()
    for n in ("h1", "h2", "h3", "idle", "auto"):
        extra = ["astart=1"] if n == "auto" else []
        cbsd("bcreate", f"jname={n}", f"image={img}", "vm_os_type=other", "vm_ram=32m",
             *extra).ok()
    cbsd("bstart", "h?").ok()
    for n in ("h1", "h2", "h3"):
        cbsd.console(n).wait(COUNTER_RE, count=2)
    cbsd("bpause", "h3", "mode=on").ok()

    # Host shutdown: every running VM hibernated (concurrently), nothing else touched.
    p = _guests_script(cbsd, "stop")
    assert p.returncode == 0, p.stderr
    states = {v["jname"]: v["status"] for v in cbsd.bls()}
    assert states == {"h1": "Suspended", "h2": "Suspended", "h3": "Suspended", "idle": "Off",
                      "auto": "Off"}
    last = {n: counter_lines(cbsd.console(n).text())[-1][0] for n in ("h1", "h2", "h3")}
    # Host boot: hibernated VMs resume where they were, astart=1 VMs start, others stay off.
    marks = {n: cbsd.console(n).mark() for n in ("h1", "h2", "h3")}
    p = _guests_script(cbsd, "start")
    assert p.returncode == 0, p.stderr
    states = {v["jname"]: v["status"] for v in cbsd.bls()}
    # h3 was paused when the host went down: it comes back as it was.
    assert states == {"h1": "On", "h2": "On", "h3": "Paused", "idle": "Off", "auto": "On"}
    time.sleep(0.5)
    assert counter_lines(cbsd.console("h3").since(marks["h3"])) == [], "h3 stays frozen"
    cbsd("bpause", "h3", "mode=off").ok()
    for n in ("h1", "h2", "h3"):
        cbsd.console(n).wait(COUNTER_RE, since=marks[n], count=2)
        first = counter_lines(cbsd.console(n).since(marks[n]))[0]
        assert first[0] == last[n] + 1 and first[2] == "OK", (n, last, first)
        assert "BOOT" not in cbsd.console(n).since(marks[n])
    cbsd.console("auto").wait(r"BOOT disk=0")


def test_bulk_suspend_reports_each(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    img = counter_image()
    for n in ("s1", "s2", "s3"):
        cbsd("bcreate", f"jname={n}", f"image={img}", "vm_os_type=other", "vm_ram=32m").ok()
    cbsd("bstart", "s1", "s2").ok()
    r = cbsd("bsuspend", "jname=s*", "parallel=2")
    assert r.code == 1
    assert sorted(r.out.split()) == sorted(["s1:", "hibernated", "s2:", "hibernated"])
    assert "s3: is Off" in r.err
    r = cbsd("bstart", "jname=s*", "parallel=3").ok()
    assert r.out.count("resumed from hibernation") == 2 and "s3: started" in r.out


def test_status_is_truthful_with_a_stale_pid(cbsd: Cbsd, running_counter: str) -> None:
    """After a host reboot the inventory's pid may belong to another process."""
    hibernate(cbsd, "vm1")
    db = cbsd.workdir / "var" / "db" / "local.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("UPDATE vm SET pid = ? WHERE jname = 'vm1'", (os.getpid(),))
    assert cbsd.status("vm1") == "Suspended"
    assert cbsd.bls("vm1")[0]["jid"] == 0


@pytest.mark.linux
def test_linux_uptime_continues_across_hibernation(cbsd: Cbsd, linux_guest) -> None:  # type: ignore[no-untyped-def]
    import re

    create_linux(cbsd, linux_guest)
    cbsd("bstart", "lx").ok()
    con = cbsd.console("lx")
    con.wait(TICK_RE, count=3, timeout=90)
    cbsd("bsuspend", "lx").ok()
    before = [float(u) for _, u, _, _ in re.findall(TICK_RE, con.text())][-1]
    mark = con.mark()
    cbsd("bstart", "lx").ok()
    con.wait(TICK_RE, since=mark, count=2, timeout=60)
    after = re.findall(TICK_RE, con.since(mark))
    assert "cbsd-guest: up" not in con.since(mark)
    assert before < float(after[0][1]) < before + 2.0, (before, after[0])
    assert all(t[3] == "OK" for t in after)
