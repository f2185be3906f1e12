"""bcheckpoint and bstart checkpoint= through the CLI, judged by what the guest prints."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import COUNTER_RE, Cbsd, counter_lines, qemu_processes
from tests.vmchecks import checkpoint, disk_tags, restore

pytestmark = pytest.mark.vm


def test_counter_continues_and_restores_twice_identically(cbsd: Cbsd,
                                                          running_counter: str) -> None:
    lo, hi = checkpoint(cbsd, "vm1", "c1")
    assert cbsd.status("vm1") == "On", "create leaves a running VM running"
    cbsd.console("vm1").wait(COUNTER_RE, since=cbsd.console("vm1").mark(), count=3)
    cbsd("bstop", "vm1", "noacpi=1").ok()
    first = restore(cbsd, "vm1", "c1")
    assert lo + 1 <= first[0][0] <= hi + 1, (lo, hi, first)
    assert [n for n, _, _ in first] == [first[0][0] + i for i in range(3)]
    assert all(ok == "OK" for _, _, ok in first)
    cbsd("bstop", "vm1", "noacpi=1").ok()
    second = restore(cbsd, "vm1", "c1")
    assert second[0] == first[0], "the same checkpoint restores the same state"
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["c1"], "restore keeps the checkpoint"


def test_disk_matches_memory_when_restoring_an_older_checkpoint(cbsd: Cbsd,
                                                               running_counter: str) -> None:
    con = cbsd.console("vm1")
    checkpoint(cbsd, "vm1", "old")
    con.wait(COUNTER_RE, since=con.mark(), count=5)  # the disk moves on
    checkpoint(cbsd, "vm1", "new")
    con.wait(COUNTER_RE, since=con.mark(), count=3)
    cbsd("bstop", "vm1", "noacpi=1").ok()
    # Scribble on the disk's counter sector: only a real disk revert can make the guest happy.
    disk = cbsd.workdir / "vm" / "vm1" / "dsk1.qcow2"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 512 512", str(disk)],
                   check=True, capture_output=True)
    old = restore(cbsd, "vm1", "old")
    assert all(ok == "OK" for _, _, ok in old), old
    cbsd("bstop", "vm1", "noacpi=1").ok()
    new = restore(cbsd, "vm1", "new")
    assert all(ok == "OK" for _, _, ok in new), new
    assert new[0][0] > old[0][0] + 3
    cbsd("bstop", "vm1", "noacpi=1").ok()
    assert restore(cbsd, "vm1", "old")[0] == old[0]


def test_paused_vm_stays_paused(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bpause", "vm1", "mode=on").ok()
    con = cbsd.console("vm1")
    mark = con.mark()
    checkpoint(cbsd, "vm1", "p")
    assert cbsd.status("vm1") == "Paused"
    time.sleep(1.0)
    # On QEMU 7.2 reactivating the disks after the save runs the guest for ~0.5 ms (see
    # savestate._put_back): one line can slip out if a timer tick falls in that window; a
    # guest left running would print ~9 lines in this second.
    assert len(counter_lines(con.since(mark))) <= 1, "a paused guest must stay paused"
    cbsd("bpause", "vm1", "mode=off").ok()
    con.wait(COUNTER_RE, since=mark, count=2)
    checkpoint(cbsd, "vm1", "p2")  # and the disks are usable again after a paused create
    assert cbsd.status("vm1") == "On"


def test_poweroff_after_checkpoint(cbsd: Cbsd, running_counter: str) -> None:
    lo, hi = checkpoint(cbsd, "vm1", "last", "poweroff=1")
    assert cbsd.status("vm1") == "Off"
    first = restore(cbsd, "vm1", "last")
    assert lo + 1 <= first[0][0] <= hi + 1
    checkpoint(cbsd, "vm1", "x", "suspend=1")  # CBSD's newer name for poweroff=1
    assert cbsd.status("vm1") == "Off"
    r = cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=y", "suspend=1")
    assert r.code == 1 and "is Off" in r.err


def test_live_checkpoint_keeps_the_guest_running(cbsd: Cbsd, running_counter: str) -> None:
    lo, hi = checkpoint(cbsd, "vm1", "live", "live=1")
    assert cbsd.status("vm1") == "On"
    assert cbsd.checkpoints("vm1")[0]["live"] is True
    cbsd("bstop", "vm1", "noacpi=1").ok()
    first = restore(cbsd, "vm1", "live")
    assert lo + 1 <= first[0][0] <= hi + 1
    assert all(ok == "OK" for _, _, ok in first)


def test_restore_paused(cbsd: Cbsd, running_counter: str) -> None:
    checkpoint(cbsd, "vm1", "c")
    cbsd("bstop", "vm1", "noacpi=1").ok()
    con = cbsd.console("vm1")
    mark = con.mark()
    r = cbsd("bstart", "vm1", "checkpoint=c", "paused=1").ok()
    assert r.out.strip() == "vm1: restored from checkpoint c (paused)"
    assert cbsd.status("vm1") == "Paused"
    time.sleep(0.7)
    assert "n=" not in con.since(mark)
    cbsd("bpause", "vm1", "mode=off").ok()
    con.wait(COUNTER_RE, since=mark, count=2)


def test_list_destroy_destroyall(cbsd: Cbsd, running_counter: str) -> None:
    for name in ("zeta", "alpha", "mid"):
        checkpoint(cbsd, "vm1", name)
    assert len(disk_tags(cbsd, "vm1")) == 3
    out = cbsd("bcheckpoint", "mode=list", "jname=vm1").ok().out
    # Each taken after the one before: a chain, '*' where the running VM is.
    assert out == "Created checkpoint for vm1:\n  zeta\n  └─ alpha\n     └─ mid *\n"
    data = cbsd.checkpoints("vm1")
    assert [d["name"] for d in data] == ["zeta", "alpha", "mid"]
    for d in data:
        assert d["created"].endswith("Z") and "T" in d["created"]  # type: ignore[union-attr]
        assert d["size"] > 0 and d["ram_mb"] == 32 and d["was_running"] is True
    r = cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=alpha").ok()
    assert r.out.strip() == "vm1: checkpoint alpha destroyed"
    assert [d["name"] for d in cbsd.checkpoints("vm1")] == ["zeta", "mid"]
    assert len(disk_tags(cbsd, "vm1")) == 2, "destroy releases the disk snapshot it owned"
    cbsd("bstop", "vm1", "noacpi=1").ok()
    assert [d["name"] for d in cbsd.checkpoints("vm1")] == ["zeta", "mid"]  # stopped VM too
    cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=zeta").ok()  # offline destroy
    assert len(disk_tags(cbsd, "vm1")) == 1
    r = cbsd("bcheckpoint", "mode=destroyall", "jname=vm1").ok()
    assert r.out.strip() == "vm1: 1 checkpoint(s) destroyed"
    assert cbsd.checkpoints("vm1") == [] and disk_tags(cbsd, "vm1") == []
    r = cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=zeta")
    assert r.code == 1 and r.err.strip() == "vm1: no checkpoint zeta"


def test_same_name_is_replaced_only_when_complete(cbsd: Cbsd, running_counter: str) -> None:
    checkpoint(cbsd, "vm1", "c")
    cbsd.console("vm1").wait(COUNTER_RE, since=cbsd.console("vm1").mark(), count=4)
    lo, hi = checkpoint(cbsd, "vm1", "c")
    assert [d["name"] for d in cbsd.checkpoints("vm1")] == ["c"]
    assert len(disk_tags(cbsd, "vm1")) == 1, "the replaced checkpoint's snapshot is released"
    cbsd("bstop", "vm1", "noacpi=1").ok()
    first = restore(cbsd, "vm1", "c")
    assert lo + 1 <= first[0][0] <= hi + 1, "the newer checkpoint is the one kept"


@pytest.mark.stream
def test_damaged_checkpoint_is_refused_and_the_disk_untouched(cbsd: Cbsd,
                                                              running_counter: str) -> None:
    checkpoint(cbsd, "vm1", "good")
    checkpoint(cbsd, "vm1", "bad")
    cbsd("bstop", "vm1", "noacpi=1").ok()
    mem = cbsd.system("vm1") / "checkpoints" / "bad.ckp" / "memory"
    data = bytearray(mem.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mem.write_bytes(data)
    disk = next((cbsd.workdir / "vm" / "vm1").glob("*.qcow2"))
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    r = cbsd("bstart", "vm1", "checkpoint=bad")
    assert r.code == 1
    assert r.err.strip() == "vm1: checkpoint bad is damaged: memory checksum mismatch"
    assert qemu_processes(cbsd.workdir) == [] and cbsd.status("vm1") == "Off"
    # The checksum is verified while QEMU starts; the disk is reverted only after it matched.
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before
    r = cbsd("bcheckpoint", "mode=verify", "jname=vm1")
    assert r.code == 1
    assert "vm1: checkpoint good: OK" in r.out
    assert "checkpoint bad is damaged: memory checksum mismatch" in r.err
    assert cbsd("bcheckpoint", "mode=verify", "jname=vm1", "name=good").ok().out.strip() == \
        "vm1: checkpoint good: OK"
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["good", "bad"]
    restore(cbsd, "vm1", "good")


def test_incompatible_checkpoint_is_refused(cbsd: Cbsd, running_counter: str) -> None:
    checkpoint(cbsd, "vm1", "c")
    cbsd("bstop", "vm1", "noacpi=1").ok()
    # No command edits a VM's RAM yet: change the definition as a future `bset` would.
    db = cbsd.workdir / "var" / "db" / "local.sqlite"
    with sqlite3.connect(db) as con:
        spec = json.loads(con.execute("SELECT spec FROM vm WHERE jname='vm1'").fetchone()[0])
        spec["ram"] = 64 << 20
        con.execute("UPDATE vm SET spec=? WHERE jname='vm1'", (json.dumps(spec),))
    r = cbsd("bstart", "vm1", "checkpoint=c")
    assert r.code == 1
    assert "checkpoint c is incompatible with the VM's configuration now: ram was 33554432, " \
           "now 67108864" in r.err
    assert qemu_processes(cbsd.workdir) == []


def test_refused_while_running_and_names_checked(cbsd: Cbsd, running_counter: str) -> None:
    checkpoint(cbsd, "vm1", "c")
    r = cbsd("bstart", "vm1", "checkpoint=c")
    assert r.code == 1 and "is running: stop it before restoring" in r.err
    for bad in ("../c", "/etc/passwd", "c.ckp", "a b"):
        r = cbsd("bcheckpoint", "mode=create", "jname=vm1", f"name={bad}")
        assert r.code == 2 and "bad name" in r.err
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["c"]


def test_masks_checkpoint_several_vms(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    img = counter_image()
    for n in ("a1", "a2", "b1"):
        cbsd("bcreate", f"jname={n}", f"image={img}", "vm_os_type=other", "vm_ram=32m").ok()
    cbsd("bstart", "a*").ok()
    r = cbsd("bcheckpoint", "mode=create", "jname=a?", "name=both").ok()
    assert r.out.count("Checkpoint was created!") == 2
    data = json.loads(cbsd("bcheckpoint", "mode=list", "jname=*", "format=json").ok().out)
    assert sorted((d["jname"], d["name"]) for d in data) == [("a1", "both"), ("a2", "both")]
    r = cbsd("bcheckpoint", "mode=create", "jname=*", "name=all")
    assert r.code == 1 and "b1: is Off" in r.err and r.out.count("Checkpoint was created!") == 2
    cbsd("bstop", "*", "noacpi=1")
    r = cbsd("bstart", "a*", "checkpoint=both").ok()
    assert r.out.count("restored from checkpoint both") == 2


def test_reboot_after_restore_boots_normally(cbsd: Cbsd, running_counter: str) -> None:
    checkpoint(cbsd, "vm1", "c")
    cbsd("bstop", "vm1", "noacpi=1").ok()
    restore(cbsd, "vm1", "c")
    con = cbsd.console("vm1")
    mark = con.mark()
    # The guest resets (as a reboot inside it would): it must boot, not re-restore.
    from cbsd.qemu.qmp import Monitor
    with Monitor(cbsd.system("vm1") / "qmp.sock", "vm1") as mon:
        mon.cmd("system_reset")
    con.wait(r"BOOT disk=\d+", since=mark)
    con.wait(COUNTER_RE, since=mark, count=2)
    assert counter_lines(con.since(mark))[0][0] == 1
    cbsd("bstop", "vm1", "noacpi=1").ok()
    mark = con.mark()
    cbsd("bstart", "vm1").ok()
    con.wait(r"BOOT disk=\d+", since=mark)


def test_a_load_longer_than_the_monitor_timeout(cbsd: Cbsd, counter_image,  # type: ignore[no-untyped-def]
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU answers QMP only now and then while it loads a state (the load holds its main
    loop). A restore must not take that for a hung QEMU however long the load: here QMP's
    answer timeout is cut to 0.1 s (in-process) for a 300 MiB load (~0.3 s)."""
    import signal

    from cbsd.cli.main import main
    from cbsd.qemu import qmp

    cbsd("bcreate", "jname=big", f"image={counter_image(fill_mib=300)}", "vm_os_type=other",
         "vm_ram=384m").ok()
    cbsd("bstart", "big").ok()
    con = cbsd.console("big")
    con.wait(COUNTER_RE, count=2)
    checkpoint(cbsd, "big", "c")
    cbsd("bstop", "big", "noacpi=1").ok()
    original = qmp.Monitor.__init__

    def impatient(self: qmp.Monitor, path: Path, jname: str, timeout: float = 30.0) -> None:
        original(self, path, jname, 0.1)

    monkeypatch.setattr(qmp.Monitor, "__init__", impatient)
    monkeypatch.setenv("CBSD_WORKDIR", str(cbsd.workdir))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    umask = os.umask(0o077)
    mark = con.mark()
    try:
        assert main(["bstart", "jname=big", "checkpoint=c"]) == 0
    finally:
        os.umask(umask)
        for s, h in handlers.items():
            signal.signal(s, h)
    con.wait(COUNTER_RE, since=mark, count=2)
    assert "BOOT" not in con.since(mark)
    cbsd("bstop", "big", "noacpi=1").ok()


def test_progress_on_a_terminal_only(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    import pty
    import re
    import select
    import sys

    # The stream path: a VM whose RAM is a file saves too fast for a progress line.
    cbsd("bcreate", "jname=big", f"image={counter_image(fill_mib=200)}", "vm_os_type=other",
         "vm_ram=256m", "vm_ramfile=off").ok()
    cbsd("bstart", "big").ok()
    cbsd.console("big").wait(COUNTER_RE, count=2, timeout=60)
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "cbsd", "bcheckpoint", "mode=create",
                          "jname=big", "name=tty"], stdin=slave, stdout=slave, stderr=slave,
                         env=cbsd.env)
    os.close(slave)
    out = b""
    while select.select([master], [], [], 10)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert p.wait(30) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    assert "big: saving" in text and "MB" in text, text[-400:]
    assert text.rstrip().endswith("checkpoints/tty.ckp"), "the result line comes last"
    r = cbsd("bcheckpoint", "mode=create", "jname=big", "name=pipe").ok()
    # A stop of a second or more (a loaded host) adds the agentless guest's clock note
    # (core/vm/pause.set_clock): that line is not progress.
    progress = [ln for ln in r.err.splitlines() if "the guest's clock is" not in ln]
    assert progress == [], "no progress output when stderr is not a terminal"


def _mapped_ram(manifest: dict[str, Any]) -> bool:
    """Whether cbsd saves this checkpoint's RAM with mapped-ram: QEMU 9+ (probed), with RAM in
    the stream (not a RAM file: then the manifest lists `ram`, the clone)."""
    return int(manifest["qemu_version"].split(".")[0]) >= 9 and "ram" not in manifest["files"]


@pytest.mark.stream
def test_direct_io_when_asked(cbsd: Cbsd, running_counter: str) -> None:
    """CBSD_DIRECT_IO=on: a mapped-ram checkpoint is written and read with O_DIRECT where
    QEMU has direct-io (9.1+) and the workdir takes O_DIRECT, and the guest continues. Where
    guest RAM is a file the stream holds device state only (no mapped-ram, so no direct-io)."""
    cbsd.env["CBSD_DIRECT_IO"] = "on"
    lo, hi = checkpoint(cbsd, "vm1", "d")
    ckdir = cbsd.system("vm1") / "checkpoints" / "d.ckp"
    m = json.loads((ckdir / "manifest.json").read_text())
    try:
        os.close(os.open(ckdir / "memory", os.O_RDONLY | os.O_DIRECT))
        takes = True
    except OSError:
        takes = False
    assert m["migration"].get("direct-io", False) is (
        _mapped_ram(m) and int(m["qemu_version"].split(".")[0]) >= 10 and takes), m
    cbsd("bstop", "vm1", "noacpi=1").ok()
    first = restore(cbsd, "vm1", "d")[0]
    assert lo <= first[0] <= hi + 1 and first[2] == "OK"


@pytest.mark.stream
def test_mapped_ram_where_qemu_has_it(cbsd: Cbsd, running_counter: str) -> None:
    """QEMU 9+ (probed): a checkpoint that is not folded is saved with mapped-ram + multifd (a
    sparse file the size of RAM) and loads back with the same capabilities; QEMU 7.2, or guest
    RAM in a file (the RAM is cloned: `ram`): the plain stream. Either way the guest
    continues, and QEMU logs no deprecation."""
    lo, hi = checkpoint(cbsd, "vm1", "m")
    ckdir = cbsd.system("vm1") / "checkpoints" / "m.ckp"
    m = json.loads((ckdir / "manifest.json").read_text())
    if _mapped_ram(m):
        assert m["migration"]["capabilities"] == ["mapped-ram", "multifd"]
        assert (ckdir / "memory").stat().st_size >= 32 << 20, "a page-addressed file"
        assert m["migration"]["direct-io"] is False  # measured slower: only if asked
    else:
        assert "capabilities" not in m["migration"], m
        if "ram" in m["files"]:
            assert (ckdir / "ram").stat().st_size >= 32 << 20, "the guest's RAM, cloned"
    cbsd.env["CBSD_MAPPED_RAM"] = "off"  # the way out: the plain stream, on any QEMU
    checkpoint(cbsd, "vm1", "p")
    plain = json.loads((cbsd.system("vm1") / "checkpoints/p.ckp/manifest.json").read_text())
    assert "capabilities" not in plain["migration"]
    del cbsd.env["CBSD_MAPPED_RAM"]
    cbsd("bstop", "vm1", "noacpi=1").ok()
    first = restore(cbsd, "vm1", "m")[0]
    assert lo <= first[0] <= hi + 1 and first[2] == "OK"
    cbsd("bstop", "vm1", "noacpi=1").ok()
    assert restore(cbsd, "vm1", "p")[0][2] == "OK"
    log = (cbsd.system("vm1") / "qemu.log").read_text()
    assert "deprecated" not in log, log
