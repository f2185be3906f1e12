"""Fault injection through the CLI against real QEMU: kill -9, SIGINT/SIGTERM, a full disk and
a dying QEMU at exact points of every state-changing operation, concurrent commands, and
deliberately corrupted checkpoints. Nothing may be lost or left half-done."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.harness import COUNTER_RE, Cbsd, qemu_processes, tmpfs
from tests.vmchecks import assert_guest_fine, disk_tags, hidden_leftovers, restore_is_sound

pytestmark = pytest.mark.vm


def manifest(cbsd: Cbsd, jname: str, name: str) -> dict[str, object]:
    """What identifies the saved state: its manifest, but for the form its stream is kept in
    (a background fold into the chunk store moves `memory` to `stream`, the same bytes)."""
    m = json.loads((cbsd.system(jname) / "checkpoints" / f"{name}.ckp" / "manifest.json")
                   .read_text())
    files = m.pop("files")
    stream = m.pop("stream", None) or files.get("memory")
    m.pop("manifest_checksum")
    return {**m, "stream": stream, "ram": files.get("ram")}


SAVE_POINTS = ["save:stopped", "save:snapshotted", "save:migrating", "save:saved",
               "save:verified", "publish:old-renamed", "save:published"]


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_kill9_during_checkpoint_create(cbsd: Cbsd, running_counter: str, point: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    old = manifest(cbsd, "vm1", "c")
    cbsd.at_failpoint(point, "bcheckpoint", "mode=create", "jname=vm1", "name=c").kill9()
    # Before any recovery: exactly one complete 'c' is visible, and it verifies.
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["c"]
    assert cbsd.status("vm1") in ("On", "Paused")
    # The next command on the VM clears what was left and puts the VM back running.
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=after").ok()
    assert hidden_leftovers(cbsd, "vm1") == []
    assert cbsd.status("vm1") == "On"
    assert sorted(c["name"] for c in cbsd.checkpoints("vm1")) == ["after", "c"]
    assert len(disk_tags(cbsd, "vm1")) == 2, "orphaned disk snapshots are released"
    cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
    now = manifest(cbsd, "vm1", "c")
    if point != "save:published":
        assert now == old, "an interrupted replacement keeps the previous checkpoint"
    assert_guest_fine(cbsd, "vm1")
    restore_is_sound(cbsd, "vm1", "c")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("point", ["save:snapshotted", "save:migrating", "save:saved"])
def test_signal_cancels_checkpoint_create(cbsd: Cbsd, running_counter: str, point: str,
                                          sig: int) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    old = manifest(cbsd, "vm1", "c")
    r = cbsd.at_failpoint(point, "bcheckpoint", "mode=create", "jname=vm1",
                          "name=c").resume(sig)
    assert r.code == 1
    assert r.err.strip() == f"cancelled by {signal.Signals(sig).name}"
    assert cbsd.status("vm1") == "On", "cancel leaves the VM as it was"
    assert hidden_leftovers(cbsd, "vm1") == []
    assert manifest(cbsd, "vm1", "c") == old
    assert len(disk_tags(cbsd, "vm1")) == 1
    assert_guest_fine(cbsd, "vm1")


@pytest.mark.parametrize("point", ["save:snapshotted", "save:saved", "suspend:saved"])
def test_kill9_during_hibernate(cbsd: Cbsd, running_counter: str, point: str) -> None:
    cbsd.at_failpoint(point, "bsuspend", "jname=vm1").kill9()
    assert cbsd.status("vm1") in ("On", "Paused")
    if point == "suspend:saved":
        # The image was complete: the next command finishes the hibernation, then resumes it.
        r = cbsd("bstart", "vm1").ok()
        assert r.out.strip() == "vm1: resumed from hibernation"
    else:
        r = cbsd("bpause", "vm1", "mode=on").ok()  # any command on the VM recovers it first
        cbsd("bpause", "vm1", "mode=off").ok()
        assert not (cbsd.system("vm1") / "hibernate.ckp").exists()
    assert hidden_leftovers(cbsd, "vm1") == [] and disk_tags(cbsd, "vm1") == []
    assert cbsd.status("vm1") == "On"
    assert_guest_fine(cbsd, "vm1")


@pytest.mark.parametrize("point", ["load:verified", "load:reverted", "load:launched",
                                   "load:loaded"])
def test_kill9_during_restore(cbsd: Cbsd, running_counter: str, point: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    cbsd("bstop", "vm1", "noacpi=1").ok()
    cbsd.at_failpoint(point, "bstart", "jname=vm1", "checkpoint=c").kill9()
    status = cbsd.status("vm1")
    if point == "load:loaded":
        # Loaded and paused (-S): resumable, and it carries on from the checkpoint.
        assert status == "Paused"
        cbsd("bpause", "vm1", "mode=off").ok()
        assert_guest_fine(cbsd, "vm1")
    else:
        # Nothing was lost: the checkpoint verifies (verify takes no lock: nothing recovered).
        r = cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
        assert "checkpoint c: OK" in r.out
        # The next locked command ends the QEMU that never got its state: cleanly off.
        assert cbsd("bstop", "vm1", "noacpi=1").ok().out.strip() == "vm1: powered off"
        assert cbsd.status("vm1") == "Off"
        assert qemu_processes(cbsd.workdir) == []
    restore_is_sound(cbsd, "vm1", "c")


def test_kill9_during_resume_after_load_drops_the_image(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bsuspend", "vm1").ok()
    cbsd.at_failpoint("resume:loaded", "bstart", "jname=vm1").kill9()
    assert cbsd.status("vm1") == "On"
    cbsd("bpause", "vm1", "mode=on").ok()  # the next command drops the used image
    assert not (cbsd.system("vm1") / "hibernate.ckp").exists()
    assert disk_tags(cbsd, "vm1") == []
    cbsd("bstop", "vm1", "noacpi=1").ok()
    assert cbsd.status("vm1") == "Off", "a used hibernation image must never be resumed again"


def test_signal_during_resume_keeps_the_image(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bsuspend", "vm1").ok()
    r = cbsd.at_failpoint("load:launched", "bstart", "jname=vm1").resume(signal.SIGTERM)
    assert r.code == 1 and "cancelled by SIGTERM" in r.err
    assert cbsd.status("vm1") == "Suspended"
    assert qemu_processes(cbsd.workdir) == []
    assert cbsd("bstart", "vm1").ok().out.strip() == "vm1: resumed from hibernation"
    assert_guest_fine(cbsd, "vm1")


# --- QEMU dies ------------------------------------------------------------------------------

def kill_qemu(cbsd: Cbsd) -> None:
    for pid in qemu_processes(cbsd.workdir):
        os.kill(pid, signal.SIGKILL)


def test_qemu_dies_during_create(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    r = cbsd.at_failpoint("save:snapshotted", "bcheckpoint", "mode=create", "jname=vm1",
                          "name=d")
    kill_qemu(cbsd)
    res = r.resume()
    assert res.code == 1 and res.err.count("\n") == 1
    assert "QEMU exited while the checkpoint was being written" in res.err
    assert cbsd.status("vm1") == "Off"
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["c"]
    cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
    assert hidden_leftovers(cbsd, "vm1") == []
    tags = disk_tags(cbsd, "vm1")
    assert len(tags) == 1 and tags[0].startswith("cbsd-c-"), tags
    restore_is_sound(cbsd, "vm1", "c")


def test_qemu_dies_during_restore(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    cbsd("bstop", "vm1", "noacpi=1").ok()
    r = cbsd.at_failpoint("load:launched", "bstart", "jname=vm1", "checkpoint=c")
    kill_qemu(cbsd)
    res = r.resume()
    assert res.code == 1 and res.err.count("\n") == 1
    assert "vm1: QEMU exited while loading the checkpoint c" in res.err
    assert cbsd.status("vm1") == "Off"
    restore_is_sound(cbsd, "vm1", "c")


def test_qemu_dies_during_resume_keeps_the_image(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bsuspend", "vm1").ok()
    r = cbsd.at_failpoint("load:launched", "bstart", "jname=vm1")
    kill_qemu(cbsd)
    res = r.resume()
    assert res.code == 1 and "QEMU exited while loading the hibernation image" in res.err
    assert cbsd.status("vm1") == "Suspended"
    cbsd("bstart", "vm1").ok()
    assert_guest_fine(cbsd, "vm1")


# --- concurrency ----------------------------------------------------------------------------

@pytest.mark.parametrize("second", [
    ("bcheckpoint", "mode=create", "jname=vm1", "name=other"),
    ("bstop", "jname=vm1", "noacpi=1"),
    ("bsuspend", "jname=vm1"),
    ("bpause", "jname=vm1"),
    ("bremove", "jname=vm1"),
])
def test_second_command_on_a_busy_vm_exits_75(cbsd: Cbsd, running_counter: str,
                                              second: tuple[str, ...]) -> None:
    first = cbsd.at_failpoint("save:snapshotted", "bcheckpoint", "mode=create", "jname=vm1",
                              "name=c")
    r = cbsd(*second)
    assert r.code == 75
    assert r.err.strip().startswith("vm1: busy: another cbsd command holds it "
                                    "(bcheckpoint create, pid ")
    assert cbsd.status("vm1") == "Maintenance"
    assert first.resume().code == 0
    assert cbsd.status("vm1") == "On"
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["c"]


def test_suspend_and_start_race(cbsd: Cbsd, running_counter: str) -> None:
    first = cbsd.at_failpoint("save:saved", "bsuspend", "jname=vm1")
    assert cbsd("bstart", "vm1").code == 75
    assert first.resume().code == 0
    assert cbsd.status("vm1") == "Suspended"


def test_different_vms_run_in_parallel(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    img = counter_image()
    for n in ("p1", "p2"):
        cbsd("bcreate", f"jname={n}", f"image={img}", "vm_os_type=other", "vm_ram=32m").ok()
    cbsd("bstart", "p*").ok()
    held = cbsd.at_failpoint("save:snapshotted", "bcheckpoint", "mode=create", "jname=p1")
    cbsd("bcheckpoint", "mode=create", "jname=p2").ok()
    cbsd("bpause", "p2").ok()
    assert held.resume().code == 0


def test_concurrent_creates_keep_the_inventory_whole(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    img = counter_image()
    procs = [cbsd.popen("bcreate", f"jname=c{i}", f"image={img}", "vm_os_type=other",
                        "vm_ram=32m") for i in range(8)]
    procs.append(cbsd.popen("bcreate", "jname=c0", f"image={img}", "vm_os_type=other"))
    codes = [p.wait(60) for p in procs]
    assert sorted(codes) == [0] * 8 + [1] or sorted(codes) == [0] * 8 + [75]
    assert [v["jname"] for v in cbsd.bls()] == [f"c{i}" for i in range(8)]


# --- full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path / "small", "96m") as mnt:
        yield Cbsd(mnt / "wd")


def test_full_disk(small_disk: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    cbsd = small_disk
    cbsd("bcreate", "jname=vm1", f"image={counter_image(fill_mib=28)}", "vm_os_type=other",
         "vm_ram=40m").ok()
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    old = manifest(cbsd, "vm1", "c")
    # Mid-write: the space check passed, then the disk fills up under QEMU's write.
    held = cbsd.at_failpoint("save:snapshotted", "bcheckpoint", "mode=create", "jname=vm1",
                             "name=d")
    filler = cbsd.workdir / "filler"
    st = os.statvfs(cbsd.workdir)
    subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - (6 << 20)), str(filler)],
                   check=True)
    r = held.resume()
    assert r.code == 1 and r.err.strip().endswith("no space left on device"), r.err
    assert cbsd.status("vm1") == "On" and hidden_leftovers(cbsd, "vm1") == []
    assert manifest(cbsd, "vm1", "c") == old
    # Predictable: refused before writing anything.
    r = cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=e")
    assert r.code == 1 and "no space left on device for the saved state" in r.err
    assert hidden_leftovers(cbsd, "vm1") == [] and cbsd.status("vm1") == "On"
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["c"]
    filler.unlink()
    cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
    assert_guest_fine(cbsd, "vm1")
    restore_is_sound(cbsd, "vm1", "c")


# --- corruption -----------------------------------------------------------------------------

def _flip(p: Path) -> None:
    data = bytearray((p / "memory").read_bytes())
    data[-100] ^= 0x40
    (p / "memory").write_bytes(data)


def _truncate(p: Path) -> None:
    with open(p / "memory", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)


def _edit_manifest(p: Path) -> None:
    m = json.loads((p / "manifest.json").read_text())
    m["restore_relevant"]["ram"] = 1 << 30
    (p / "manifest.json").write_text(json.dumps(m))


CORRUPTIONS = {
    "flipped byte": (_flip, "memory checksum mismatch"),
    "truncated": (_truncate, "truncated"),
    "missing memory": (lambda p: (p / "memory").unlink(), "memory is missing"),
    "missing manifest": (lambda p: (p / "manifest.json").unlink(), "manifest is missing"),
    "edited manifest": (_edit_manifest, "manifest was altered"),
}


@pytest.mark.stream
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_is_detected_before_restore(cbsd: Cbsd, running_counter: str,
                                               kind: str) -> None:
    damage, message = CORRUPTIONS[kind]
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    cbsd("bstop", "vm1", "noacpi=1").ok()
    damage(cbsd.system("vm1") / "checkpoints" / "c.ckp")
    disk = cbsd.workdir / "vm" / "vm1" / "dsk1.qcow2"
    before = hashlib.sha256(disk.read_bytes()).digest()
    r = cbsd("bstart", "vm1", "checkpoint=c")
    assert r.code == 1 and message in r.err and r.err.count("\n") == 1
    assert qemu_processes(cbsd.workdir) == [] and cbsd.status("vm1") == "Off"
    assert hashlib.sha256(disk.read_bytes()).digest() == before, "the disk was reverted"
    r = cbsd("bcheckpoint", "mode=verify", "jname=vm1", "name=c")
    assert r.code == 1 and message in r.err


def test_missing_disk_snapshot_is_detected(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    cbsd("bstop", "vm1", "noacpi=1").ok()
    disk = cbsd.workdir / "vm" / "vm1" / "dsk1.qcow2"
    subprocess.run(["qemu-img", "snapshot", "-d", disk_tags(cbsd, "vm1")[0], str(disk)],
                   check=True)
    r = cbsd("bstart", "vm1", "checkpoint=c")
    assert r.code == 1 and "disk snapshot" in r.err and "is missing" in r.err
    assert qemu_processes(cbsd.workdir) == []


# --- names and symlinks cannot escape the workdir -------------------------------------------

def test_symlink_in_checkpoint_dir_is_never_followed(cbsd: Cbsd, running_counter: str,
                                                    tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (outside / "manifest.json").write_text("{}")
    link = cbsd.system("vm1") / "checkpoints" / "evil.ckp"
    link.symlink_to(outside)
    assert cbsd.checkpoints("vm1") == [], "a symlink is not a checkpoint"
    r = cbsd("bstart", "vm1", "checkpoint=evil")
    assert r.code == 1
    cbsd("bstop", "vm1", "noacpi=1").ok()
    r = cbsd("bstart", "vm1", "checkpoint=evil")
    assert r.code == 1 and "no checkpoint evil" in r.err
    cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=evil").fails(1, "no checkpoint evil")
    assert link.is_symlink(), "a link is not a checkpoint to destroy"
    r = cbsd("bcheckpoint", "mode=destroyall", "jname=vm1").ok()
    assert r.out.strip() == "vm1: 0 checkpoint(s) destroyed"
    assert (outside / "precious").read_text() == "keep me", "nothing outside was touched"
    assert qemu_processes(cbsd.workdir) == []


def test_sigterm_cancels_parallel_hibernation(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    """Signals reach only the main thread; VMs hibernating in worker threads must still cancel
    (the host-shutdown script relies on it when its time budget runs out)."""
    img = counter_image()
    for n in ("w1", "w2"):
        cbsd("bcreate", f"jname={n}", f"image={img}", "vm_os_type=other", "vm_ram=32m").ok()
    cbsd("bstart", "w*").ok()
    r = cbsd.at_failpoint("save:migrating", "bsuspend", "jname=w*", "parallel=2")
    res = r.resume(signal.SIGTERM)
    assert res.code == 1 and "cancelled by SIGTERM" in res.err, res
    assert "hibernated" not in res.out
    for n in ("w1", "w2"):
        assert cbsd.status(n) == "On", n
        assert not (cbsd.system(n) / "hibernate.ckp").exists()
        assert hidden_leftovers(cbsd, n) == [] and disk_tags(cbsd, n) == []
        assert_guest_fine(cbsd, n)


def test_kill9_while_a_checkpoint_is_destroyed_releases_its_disk_snapshot(
        cbsd: Cbsd, running_counter: str) -> None:
    """A delete hides the state, has its files removed by a detached process, then releases
    its disk snapshots: killed between the last two (with the files already gone), the next
    command still releases them (found by pass 4's kill loop: an orphaned snapshot)."""
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    held = cbsd.at_failpoint("drop:hidden", "bcheckpoint", "mode=destroy", "jname=vm1",
                             "name=c")
    assert hidden_leftovers(cbsd, "vm1") == [], "the detached removal finishes meanwhile"
    held.kill9()
    assert cbsd.checkpoints("vm1") == []
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=after").ok()
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["after"]
    assert len(disk_tags(cbsd, "vm1")) == 1, "the destroyed checkpoint's snapshot is released"
    assert_guest_fine(cbsd, "vm1")


@pytest.mark.stream  # no background fold rewrites the manifest this test damages
def test_a_damaged_checkpoint_keeps_its_disk_snapshot_until_it_is_destroyed(
        cbsd: Cbsd, running_counter: str) -> None:
    """What a damaged manifest owns is unknown, so no sweep may take its snapshot for an
    orphan (one did, when another checkpoint was destroyed): it goes when it is destroyed."""
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=a").ok()
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=b").ok()
    assert len(disk_tags(cbsd, "vm1")) == 2
    _edit_manifest(cbsd.system("vm1") / "checkpoints" / "b.ckp")
    cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=a").ok()
    assert len(disk_tags(cbsd, "vm1")) == 1, "b's snapshot is kept while b is unreadable"
    cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=b").ok()
    assert disk_tags(cbsd, "vm1") == []
    assert_guest_fine(cbsd, "vm1")
