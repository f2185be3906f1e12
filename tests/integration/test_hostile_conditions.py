"""What a hostile tester broke (issue 11), each through the CLI on a real VM: files of a VM
that lost its inventory entry, a QEMU orphaned during its launch, verify racing destroy, a
wedged QEMU, a workdir cbsd did not create, host boot/shutdown with no VMs, and the smaller
ones. Each test failed before its fix."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import cbsd as cbsd_pkg
from tests.harness import (
    COUNTER_RE,
    Cbsd,
    counter_lines,
    proc_alive,
    qemu_processes,
    start_counter,
    tmpfs,
)
from tests.vmchecks import assert_guest_fine, disk_tags, hidden_leftovers, restore_is_sound

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[2]


def lose_inventory(cbsd: Cbsd) -> None:
    for p in (cbsd.workdir / "var" / "db").glob("local.sqlite*"):
        p.unlink()


def vm_files(cbsd: Cbsd, jname: str) -> dict[str, int]:
    """Every file of the VM by its inode: none deleted, none replaced. (Not by size: the
    running guest keeps writing its disk.)"""
    out = {}
    for top in (cbsd.system(jname), cbsd.workdir / "vm" / jname):
        for p in top.rglob("*"):
            if p.is_file() and not p.is_socket() and p.name != "console.log":
                out[str(p.relative_to(cbsd.workdir))] = p.stat().st_ino
    return out


# --- 1. never delete what cbsd cannot prove it made -------------------------------------------

@pytest.mark.stream  # compares every file before and after: no background fold meanwhile
def test_bcreate_over_a_vm_that_lost_its_inventory_entry_deletes_nothing(
        cbsd: Cbsd, running_counter: str, counter_image) -> None:  # type: ignore[no-untyped-def]
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    pid = cbsd.pid("vm1")
    before = vm_files(cbsd, "vm1")
    lose_inventory(cbsd)
    r = cbsd("bcreate", "jname=vm1", f"image={counter_image()}", "vm_os_type=other",
             "vm_ram=32m").fails(1, "is not in the inventory, but files of a VM by that name")
    assert "jails-system/vm1" in r.err and "cbsd bregister jname=vm1" in r.err
    assert vm_files(cbsd, "vm1") == before, "nothing of the VM was deleted or changed"
    assert proc_alive(pid) and qemu_processes(cbsd.workdir) == [pid]
    # The inventory is rebuilt from the VM's files; the running QEMU is found again.
    assert cbsd("bregister", "jname=*").ok().out.strip() == "vm1: registered"
    assert cbsd.status("vm1") == "On" and cbsd.pid("vm1") == pid
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["c"]
    assert_guest_fine(cbsd, "vm1")
    restore_is_sound(cbsd, "vm1", "c")


def test_bregister_refuses_what_it_cannot_register(cbsd: Cbsd, counter_vm: str) -> None:
    cbsd("bregister", "jname=vm1").fails(1, "vm1: already registered")
    cbsd("bregister", "jname=nosuch").fails(1, "nosuch: no VM files to register")
    cbsd("bregister", "jname=x*").fails(2, "No unregistered VM matches the mask: x*")


def test_a_killed_bcreate_is_cleared_by_the_next_one(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    img = counter_image()
    args = ("bcreate", "jname=vm1", f"image={img}", "vm_os_type=other", "vm_ram=32m")
    cbsd.at_failpoint("bcreate:disk", *args).kill9()
    assert (cbsd.workdir / "vm" / "vm1" / "dsk1.qcow2").exists()
    assert cbsd.bls() == []
    cbsd("bregister", "jname=vm1").fails(1, "cut short: nothing to register")
    cbsd(*args).ok()
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)


def test_a_killed_bremove_is_cleared_by_the_next_bcreate(cbsd: Cbsd, running_counter: str,
                                                         counter_image) -> None:  # type: ignore[no-untyped-def]
    cbsd.at_failpoint("bremove:unlisted", "bremove", "jname=vm1").kill9()
    assert cbsd.bls() == [] and qemu_processes(cbsd.workdir) == []
    cbsd("bcreate", "jname=vm1", f"image={counter_image()}", "vm_os_type=other",
         "vm_ram=32m").ok()
    assert cbsd.checkpoints("vm1") == []


# --- 2. a QEMU orphaned by kill -9 during its launch --------------------------------------------

@pytest.mark.parametrize("how", ["boot", "restore", "resume"])
def test_kill9_during_launch_leaves_no_unseen_qemu(cbsd: Cbsd, running_counter: str,
                                                    how: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    if how == "resume":
        cbsd("bsuspend", "vm1").ok()
    else:
        cbsd("bstop", "vm1", "noacpi=1").ok()
    args = {"boot": ("bstart", "jname=vm1"), "restore": ("bstart", "jname=vm1", "checkpoint=c"),
            "resume": ("bstart", "jname=vm1")}[how]
    cbsd.at_failpoint("launch:started", *args).kill9()
    [pid] = qemu_processes(cbsd.workdir)
    # bls sees it at once (no lock taken): a booting VM is On, a loading one waits paused.
    assert cbsd.bls("vm1")[0]["jid"] == pid
    assert cbsd.status("vm1") == ("On" if how == "boot" else "Paused")
    if how == "boot":
        cbsd("bstart", "vm1").fails(1, "vm1: already running")
        assert cbsd("bstop", "vm1", "noacpi=1").ok().out.strip() == "vm1: powered off"
        assert qemu_processes(cbsd.workdir) == []
    else:
        # The next command ends the QEMU that never got its state, then does its own work.
        cbsd("bstart", *args[1:]).ok()
        [new] = qemu_processes(cbsd.workdir)
        assert new != pid and not proc_alive(pid)
        assert_guest_fine(cbsd, "vm1")
    assert cbsd("bremove", "vm1").ok()
    assert qemu_processes(cbsd.workdir) == [], "bremove leaves no QEMU running"


def test_bremove_ends_a_qemu_the_inventory_never_recorded(cbsd: Cbsd, counter_vm: str) -> None:
    cbsd.at_failpoint("launch:started", "bstart", "jname=vm1").kill9()
    (cbsd.system("vm1") / "qemu.pid").unlink()  # even without QEMU's pid file
    [pid] = qemu_processes(cbsd.workdir)
    cbsd("bremove", "vm1").ok()
    assert not proc_alive(pid) and qemu_processes(cbsd.workdir) == []
    assert not (cbsd.workdir / "vm" / "vm1").exists()


# --- 3. verify racing destroy and replace --------------------------------------------------------

def test_verify_never_calls_a_race_damage(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=keep").ok()
    stop = threading.Event()
    results: list[tuple[int, str]] = []

    def verifier() -> None:
        while not stop.is_set():
            r = cbsd("bcheckpoint", "mode=verify", "jname=vm1")
            results.append((r.code, r.err))

    t = threading.Thread(target=verifier)
    t.start()
    try:
        for i in range(12):
            cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=x").ok()  # create, replace
            if i % 2:
                cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=x").ok()
    finally:
        stop.set()
        t.join()
    assert len(results) >= 5
    assert [r for r in results if r[0] != 0] == [], results
    cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()


# --- 4. a wedged QEMU ---------------------------------------------------------------------------

def test_a_wedged_qemu_is_listed_quickly_and_powered_off(cbsd: Cbsd, running_counter: str) -> None:
    pid = cbsd.pid("vm1")
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = cbsd("bls", "format=json", "jname=vm1").ok()
        assert time.monotonic() - started < 5, "bls does not wait out the monitor"
        assert '"status": "On"' in r.out
        assert "QEMU (pid" in r.err and "does not answer its monitor" in r.err
        assert "noacpi=1" in r.err
        cbsd("bcheckpoint", "mode=create", "jname=vm1").fails(1, "does not answer its monitor")
        started = time.monotonic()
        assert cbsd("bstop", "vm1", "noacpi=1").ok().out.strip() == "vm1: powered off"
        assert time.monotonic() - started < 10
    finally:
        if proc_alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert not proc_alive(pid) and cbsd.status("vm1") == "Off"
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)


# --- 5. the workdir's mode ----------------------------------------------------------------------

def test_a_workdir_cbsd_did_not_create_keeps_its_mode(tmp_path: Path, counter_image) -> None:  # type: ignore[no-untyped-def]
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    cbsd = Cbsd(shared)
    cbsd.bls()
    cbsd("bcreate", "jname=vm1", f"image={counter_image()}", "vm_os_type=other",
         "vm_ram=32m").ok()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    # What cbsd creates inside is owner-only.
    for sub in ("var", "jails-system", "vm", "jails-system/vm1", "vm/vm1"):
        assert stat.S_IMODE((shared / sub).stat().st_mode) == 0o700, sub


def test_bls_on_a_workdir_that_does_not_exist_creates_nothing(tmp_path: Path) -> None:
    cbsd = Cbsd(tmp_path / "none")
    assert cbsd.bls() == []
    assert cbsd("bls").ok().out.split() == [c.upper() for c in (
        "jname", "jid", "vm_ram", "vm_curmem", "vm_cpus", "pcpu", "vm_os_type", "ip4_addr",
        "status", "vnc_port")]
    assert not (tmp_path / "none").exists()


# --- 6. host boot and shutdown with no VMs ------------------------------------------------------

def test_host_integration_on_a_host_with_no_vms(tmp_path: Path) -> None:
    cbsd = Cbsd(tmp_path / "wd")
    env = {**cbsd.env, "CBSD_GUESTS_CONFIG": "/nonexistent",
           "CBSD": str(Path(sys.executable).parent / "cbsd")}
    for action in ("stop", "start"):
        p = subprocess.run([str(ROOT / "contrib" / "cbsd-guests"), action], env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stderr == "", (action, p.stderr)
    # A mask alone still says when it matches nothing.
    cbsd("bstart", "jname=*").fails(2, "No VM matches the mask: *")


# --- 7. no traceback, whatever the environment --------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path / "tiny", "64m") as mnt:
        yield mnt


def fill(path: Path) -> None:
    """Fill the filesystem to the last block (files 'filler' and 'filler2')."""
    for name, block in (("filler", 1 << 20), ("filler2", 4096)):
        fd = os.open(path / name, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\1" * block)
        except OSError:
            pass
        finally:
            os.close(fd)


def test_a_full_disk_still_lets_cbsd_list_stop_and_free_space(tiny_fs: Path,
                                                              counter_image) -> None:  # type: ignore[no-untyped-def]
    cbsd = Cbsd(tiny_fs / "wd")
    start_counter(cbsd, counter_image(fill_mib=8))
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=d").ok()
    fill(tiny_fs)
    # The guest's own disk is on the full filesystem too: its next write makes QEMU pause it
    # (an I/O error), which bls reports truthfully.
    assert cbsd.status("vm1") in ("On", "Paused")
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["c", "d"]
    cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=e").fails(1, "no space left on device")
    cbsd("bcreate", "jname=vm2", f"image={counter_image()}", "vm_os_type=other",
         "vm_ram=32m").fails(1, "No space left on device")
    assert not (cbsd.workdir / "vm" / "vm2").exists(), "a failed bcreate leaves nothing"
    assert cbsd("bstop", "vm1", "noacpi=1").ok().out.strip() == "vm1: powered off"
    cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=d").ok()
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["c"]
    assert cbsd.bls("vm1")[0]["status"] == "Off"
    for f in ("filler", "filler2"):
        (tiny_fs / f).unlink()
    restore_is_sound(cbsd, "vm1", "c")
    assert hidden_leftovers(cbsd, "vm1") == []
    assert len(disk_tags(cbsd, "vm1")) == 1, "the destroyed checkpoint's snapshot went too"


def test_a_read_only_workdir_can_still_be_listed(tiny_fs: Path, counter_image) -> None:  # type: ignore[no-untyped-def]
    cbsd = Cbsd(tiny_fs / "wd")
    start_counter(cbsd, counter_image())
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    cbsd("bstop", "vm1", "noacpi=1").ok()
    # Detached helpers (a background fold that just gave way, a deletion) may still have a
    # file open for writing for a moment: the remount waits for them.
    for _ in range(100):
        if subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)],
                          capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{tiny_fs} stayed busy: it could not be made read-only")
    try:
        assert [v["status"] for v in cbsd.bls()] == ["Off"]
        assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["c"]
        cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
        cbsd("bstart", "vm1").fails(1, "is on a read-only file system")
        cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=c").fails(1, "read-only file")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_fs)], check=True)


@pytest.mark.parametrize(("setup", "grep"), [
    ("garbage", "is damaged (file is not a database): move it aside, then 'cbsd bregister"),
    ("truncated", "is damaged"),
])
def test_a_damaged_inventory_is_one_line(cbsd: Cbsd, counter_vm: str, setup: str,
                                         grep: str) -> None:
    db = cbsd.workdir / "var" / "db" / "local.sqlite"
    for p in db.parent.glob("local.sqlite-*"):
        p.unlink()
    if setup == "garbage":
        db.write_bytes(b"this is not sqlite" * 100)
    else:
        db.write_bytes(db.read_bytes()[:200])
    for args in (("bls",), ("bstart", "vm1"), ("bcheckpoint", "mode=list", "jname=vm1")):
        cbsd(*args).fails(1, grep)
    # The way out the message names: move it aside, rebuild from the VM's files.
    db.rename(db.with_name("damaged.sqlite"))
    assert cbsd("bregister", "jname=*").ok().out.strip() == "vm1: registered"
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)


@pytest.mark.parametrize(("workdir", "grep"), [
    ("/dev/null/x", "cannot use workdir /dev/null/x"),
    ("{tmp}/file", "is not a folder"),
])
def test_a_bad_workdir_is_one_line(tmp_path: Path, workdir: str, grep: str) -> None:
    (tmp_path / "file").write_text("")
    cbsd = Cbsd(Path(workdir.format(tmp=tmp_path)))
    cbsd("bcreate", "jname=vm1", "vm_ram=32m").fails(1, grep.format(tmp=tmp_path))
    cbsd("bstop", "jname=vm1").fails(1, grep.format(tmp=tmp_path))


def test_a_workdir_the_user_cannot_read_is_one_line(tmp_path: Path) -> None:
    wd = tmp_path / "private"
    wd.mkdir(mode=0o700)
    os.chmod(tmp_path, 0o755)
    # The user runs cbsd from where they can read it: a clone in root's home (0700, where a new
    # user clones), its venv and pytest's own temp folders are not readable by nobody. A
    # world-readable copy of cbsd's package, run by the interpreter the venv was made from, is.
    with tempfile.TemporaryDirectory(prefix="cbsd-nobody-") as lib:
        shutil.copytree(Path(cbsd_pkg.__file__).parent, Path(lib) / "cbsd",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for d in (Path(lib), *Path(lib).rglob("*")):
            os.chmod(d, 0o755 if d.is_dir() else 0o644)
        env = {"CBSD_WORKDIR": str(wd), "PATH": os.environ["PATH"], "PYTHONPATH": lib,
               "PYTHONDONTWRITEBYTECODE": "1"}
        for args in (["bls"], ["bstart", "vm1"]):
            p = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                                os.path.realpath(sys.executable), "-m", "cbsd", *args],
                               capture_output=True, text=True, env=env, cwd="/", timeout=60)
            assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
            assert "Permission denied" in p.stderr and "Traceback" not in p.stderr


# --- 8. the smaller ones ------------------------------------------------------------------------

def test_impossible_ram_and_repeated_ports_are_refused_at_bcreate(cbsd: Cbsd,
                                                                  counter_image) -> None:  # type: ignore[no-untyped-def]
    img = counter_image()
    cbsd("bcreate", "jname=vm1", f"image={img}", "vm_ram=99999t").fails(
        2, "is more than this host's memory")
    cbsd("bcreate", "jname=vm1", f"image={img}", "hostfwd=tcp:2222:22,tcp:2222:80").fails(
        2, "host port tcp:2222 is forwarded twice")
    assert cbsd.bls() == [] and not (cbsd.workdir / "vm" / "vm1").exists()


def test_no_checkpoint_of_a_disk_moved_away(cbsd: Cbsd, running_counter: str) -> None:
    disk = cbsd.workdir / "vm" / "vm1" / "dsk1.qcow2"
    moved = disk.with_name("moved.qcow2")
    disk.rename(moved)
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").fails(
        1, "is gone (moved or deleted while the VM runs)")
    moved.rename(disk)
    assert cbsd.checkpoints("vm1") == [] and hidden_leftovers(cbsd, "vm1") == []
    assert disk_tags(cbsd, "vm1") == [] and cbsd.status("vm1") == "On"
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()


def test_a_paused_vm_comes_back_from_hibernation_paused(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bpause", "vm1", "mode=on").ok()
    cbsd("bsuspend", "vm1").ok()
    con = cbsd.console("vm1")
    mark = con.mark()
    r = cbsd("bstart", "vm1").ok()
    assert r.out.strip() == "vm1: resumed from hibernation (paused)"
    assert cbsd.status("vm1") == "Paused"
    time.sleep(1.0)
    assert counter_lines(con.since(mark)) == []
    cbsd("bpause", "vm1", "mode=off").ok()
    con.wait(COUNTER_RE, since=mark, count=2)
    assert "BOOT" not in con.since(mark)


def test_verify_does_not_follow_a_planted_symlink(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    (cbsd.system("vm1") / "checkpoints" / "evil.ckp").symlink_to(
        cbsd.system("vm1") / "checkpoints" / "c.ckp")
    cbsd("bcheckpoint", "mode=verify", "jname=vm1", "name=evil").fails(1, "no checkpoint evil")
    r = cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
    assert r.out.strip() == "vm1: checkpoint c: OK"


def test_a_status_probe_never_makes_another_command_busy(cbsd: Cbsd, running_counter: str) -> None:
    """bls probes each VM's lock for an instant (a shared flock); a command taking the lock
    right then waits the probe out instead of failing with 75 -- and a 75 names the holder,
    or says it has not named itself yet."""
    import fcntl

    lock = cbsd.workdir / "var" / "lock" / "vm1.lock"
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # exactly what a status probe holds
        threading.Timer(0.2, fcntl.flock, (fd, fcntl.LOCK_UN)).start()
        assert cbsd("bpause", "vm1").ok().out.strip() == "vm1: paused"  # the quick lane
        fcntl.flock(fd, fcntl.LOCK_SH)
        threading.Timer(0.2, fcntl.flock, (fd, fcntl.LOCK_UN)).start()
        cbsd("bpause", "jname=vm?").ok()  # the full command
        fcntl.flock(fd, fcntl.LOCK_EX)  # a holder that never says who it is
        cbsd("bpause", "vm1").fails(75, "vm1: busy: another cbsd command holds it (it has "
                                        "not said which yet)")
    finally:
        os.close(fd)
    assert cbsd.status("vm1") == "On"


# --- the manifest format changes; yesterday's checkpoints still restore -------------------------

def test_a_format_1_checkpoint_restores(cbsd: Cbsd, running_counter: str) -> None:
    """A checkpoint whose manifest is in format 1 (as cbsd wrote them before format 2 added
    `parent`) restores and continues: the upgrade on read keeps old checkpoints usable."""
    import json

    from cbsd.storage import ckpstore

    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    path = cbsd.system("vm1") / "checkpoints" / "c.ckp" / "manifest.json"
    data = json.loads(path.read_text())
    del data["parent"], data["manifest_checksum"]
    data["format"] = 1
    path.write_text(json.dumps(ckpstore._seal(data)))
    [listed] = cbsd.checkpoints("vm1")
    assert listed["name"] == "c" and listed["parent"] is None and not listed["damaged"]
    cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
    restore_is_sound(cbsd, "vm1", "c")
