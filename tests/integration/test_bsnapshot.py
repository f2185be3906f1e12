"""bsnapshot (issue 23 part 4): disk-only snapshots through the CLI, on real VMs.

A stopped VM's disk is written with qemu-io at an offset the boot-sector guest never touches
(what it holds is the test's evidence); a running Debian guest with its agent is frozen for
the snapshot's instant, and thawed after, even when cbsd is killed between freeze and thaw."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cbsd.errors import QemuError
from cbsd.qemu.agent import Agent
from tests.guests.debian_ssh import Debian
from tests.guests.hosts import joined
from tests.harness import Cbsd, proc_cmdline, start_counter

pytestmark = [pytest.mark.vm]

AT = 512 << 10  # half-way into the 1 MiB disk: past the counter guest's boot sector and counter


def qemu_io() -> str:
    """qemu-io of the QEMU under test (beside CBSD_QEMU_IMG when set)."""
    beside = Path(os.environ.get("CBSD_QEMU_IMG", "/usr/bin/qemu-img")).with_name("qemu-io")
    return str(beside) if beside.exists() else shutil.which("qemu-io") or "qemu-io"


def disk(cbsd: Cbsd, jname: str, name: str = "dsk1.qcow2") -> Path:
    return cbsd.workdir / "vm" / jname / name


def write(path: Path, pattern: int) -> None:
    subprocess.run([qemu_io(), "-f", "qcow2", "-c", f"write -P {pattern} {AT} 64k", str(path)],
                   check=True, capture_output=True)


def holds(path: Path, pattern: int) -> bool:
    p = subprocess.run([qemu_io(), "-f", "qcow2", "-r", "-U", "-c", f"read -P {pattern} {AT} 64k",
                        str(path)], capture_output=True, text=True, check=False)
    if "Pattern verification failed" in p.stdout + p.stderr:
        return False
    assert p.returncode == 0, p
    return True


def tags(path: Path) -> list[str]:
    p = subprocess.run([os.environ.get("CBSD_QEMU_IMG", "qemu-img"), "info", "-U",
                        "--output=json", str(path)], capture_output=True, text=True, check=True)
    return [s["name"] for s in json.loads(p.stdout).get("snapshots", [])]


def names(cbsd: Cbsd, jname: str) -> list[str]:
    out = cbsd("bsnapshot", "mode=list", f"jname={jname}", "format=json").ok().out
    return [r["snapname"] for r in json.loads(out)]


def test_stopped_vm_create_list_rollback_destroy(cbsd: Cbsd, counter_vm: str) -> None:
    d = disk(cbsd, counter_vm)
    write(d, 0xAA)
    r = cbsd("bsnapshot", "mode=create", f"jname={counter_vm}", "name=first").ok()
    assert r.out == f"{counter_vm}: snapshot first created (the VM is off)\n"
    write(d, 0xBB)
    # CBSD's key (snapname=) and its 'gettimeofday' name: the time, to the second.
    cbsd("bsnapshot", "mode=create", counter_vm, "snapname=gettimeofday").ok()
    listed = names(cbsd, counter_vm)
    assert listed[0] == "first" and len(listed) == 2 and listed[1].isdigit(), listed
    table = cbsd("bsnapshot", "mode=list", counter_vm).ok().out.splitlines()
    assert table[0].split() == ["JNAME", "SNAPNAME", "CREATED", "DISKS"]
    assert table[1].split()[:2] == [counter_vm, "first"] and "dsk1.qcow2" in table[1]
    assert [ln.split() for ln in cbsd("bsnapshot", "mode=list", counter_vm, "header=0").ok()
            .out.splitlines()] == [ln.split() for ln in table[1:]]
    # Back to the first: what was written after it is gone; the later snapshot stays.
    cbsd("bsnapshot", "mode=rollback", counter_vm, "name=first").ok()
    assert holds(d, 0xAA)
    assert names(cbsd, counter_vm) == listed
    cbsd("bsnapshot", "mode=rollback", counter_vm, f"name={listed[1]}").ok()
    assert holds(d, 0xBB)
    cbsd("bsnapshot", "mode=destroy", counter_vm, "name=first").ok()
    assert names(cbsd, counter_vm) == listed[1:]
    assert cbsd("bsnapshot", "mode=destroyall", counter_vm).ok().out \
        == f"{counter_vm}: 1 snapshot(s) destroyed\n"
    assert names(cbsd, counter_vm) == [] and tags(d) == []
    # The VM still boots from its disk.
    cbsd("bstart", counter_vm).ok()
    assert cbsd.status(counter_vm) == "On"


def test_snapshots_and_checkpoints_leave_each_other_whole(cbsd: Cbsd, counter_vm: str) -> None:
    """A rollback leaves every checkpoint restorable (each restores its own disk state), and
    a checkpoint restore leaves every snapshot as it was."""
    vm, d = counter_vm, disk(cbsd, counter_vm)
    write(d, 0xAA)
    cbsd("bsnapshot", "mode=create", vm, "name=s").ok()
    write(d, 0xBB)
    cbsd("bstart", vm).ok()
    cbsd("bcheckpoint", "mode=create", f"jname={vm}", "name=ck").ok()  # its disk holds 0xBB
    # A running VM's rollback is refused, and changes nothing.
    cbsd("bsnapshot", "mode=rollback", vm, "name=s").fails(1, "is running: stop it first")
    cbsd("bstop", vm, "noacpi=1").ok()
    assert holds(d, 0xBB)
    cbsd("bsnapshot", "mode=rollback", vm, "name=s").ok()
    assert holds(d, 0xAA)
    cbsd("bcheckpoint", "mode=verify", f"jname={vm}").ok()
    cbsd("bstart", vm, "checkpoint=ck").ok()  # the checkpoint's disk state comes back
    cbsd("bstop", vm, "noacpi=1").ok()
    assert holds(d, 0xBB)
    assert names(cbsd, vm) == ["s"]
    cbsd("bsnapshot", "mode=rollback", vm, "name=s").ok()
    assert holds(d, 0xAA)
    # Destroying the snapshots takes none of the checkpoint's disk state with it.
    cbsd("bsnapshot", "mode=destroyall", vm).ok()
    cbsd("bcheckpoint", "mode=verify", f"jname={vm}").ok()
    cbsd("bstart", vm, "checkpoint=ck").ok()


def test_running_vm_without_an_agent_is_crash_consistent(cbsd: Cbsd,
                                                          running_counter: str) -> None:
    vm = running_counter
    r = cbsd("bsnapshot", "mode=create", vm, "name=live").ok()
    assert "crash-consistent" in r.out and "install qemu-guest-agent" in r.out, r.out
    cbsd("bpause", vm, "mode=on").ok()
    assert "crash-consistent: the VM is paused" in cbsd("bsnapshot", "mode=create", vm,
                                                        "name=paused").ok().out
    cbsd("bpause", vm, "mode=off").ok()
    assert names(cbsd, vm) == ["live", "paused"]
    assert sorted(tags(disk(cbsd, vm))) == ["bsnapshot-live", "bsnapshot-paused"]
    cbsd("bsnapshot", "mode=destroy", vm, "name=live").ok()  # through QEMU, which runs on
    assert names(cbsd, vm) == ["paused"] and cbsd.status(vm) == "On"


def test_bad_input_is_one_line_exit_2_and_nothing_made(cbsd: Cbsd, counter_vm: str) -> None:
    vm, d = counter_vm, disk(cbsd, counter_vm)
    cbsd("bsnapshot", "mode=create", vm, "name=keep").ok()
    before = tags(d)
    cbsd("bsnapshot", vm, "name=x").fails(2, "missing required key 'mode'")
    cbsd("bsnapshot", vm, "mode=snap").fails(2, "bad value for mode")
    cbsd("bsnapshot", vm, "mode=create", "name=../x").fails(2, "../x")
    cbsd("bsnapshot", vm, "mode=create", "name=a b").fails(2, "a b")
    cbsd("bsnapshot", vm, "mode=create", "name=keep").fails(2, "snapshot keep exists")
    cbsd("bsnapshot", vm, "mode=create", "format=json").fails(2, "format= is not used")
    cbsd("bsnapshot", vm, "mode=create", "nosuchkey=1").fails(2, "unknown key 'nosuchkey'")
    cbsd("bsnapshot", vm, "mode=destroy").fails(2, "needs name=")
    cbsd("bsnapshot", vm, "mode=rollback").fails(2, "needs name=")
    cbsd("bsnapshot", vm, "mode=destroy", "name=none").fails(2, "no snapshot none")
    cbsd("bsnapshot", vm, "mode=rollback", "name=none").fails(2, "no snapshot none")
    cbsd("bsnapshot", vm, "mode=list", "name=keep").fails(2, "name= is not used")
    cbsd("bsnapshot", "nosuch", "mode=create").fails(2, "No such VM: nosuch")
    cbsd("bsnapshot", "mode=list").fails(2, "missing required key 'jname'")
    assert tags(d) == before and names(cbsd, vm) == ["keep"]
    assert "mode=" in cbsd("bsnapshot", "--help").ok().out


def test_kill9_mid_create_and_mid_rollback_is_finished_by_the_next_command(
        cbsd: Cbsd, counter_vm: str) -> None:
    vm, d = counter_vm, disk(cbsd, counter_vm)
    # A create killed once its snapshot exists but before it said so: never listed, and
    # undone by the next command, so the name can be used again.
    cbsd.at_failpoint("bsnapshot:taken", "bsnapshot", "mode=create", vm, "name=cut").kill9()
    assert "bsnapshot-cut" in tags(d) and "cut" not in names(cbsd, vm)
    cbsd("bsnapshot", "mode=create", vm, "name=cut").ok()
    assert tags(d).count("bsnapshot-cut") == 1
    # A rollback of two disks killed after the first: the next command completes it.
    cbsd("bhyve-dsk", "mode=attach", f"jname={vm}", "dsk_size=4m").ok()
    d2 = disk(cbsd, vm, "dsk2.qcow2")
    write(d, 0xAA)
    write(d2, 0xAA)
    cbsd("bsnapshot", "mode=create", vm, "name=two").ok()
    write(d, 0xBB)
    write(d2, 0xBB)
    cbsd.at_failpoint("bsnapshot:reverted-one", "bsnapshot", "mode=rollback", vm,
                      "name=two").kill9()
    assert holds(d, 0xAA) != holds(d2, 0xAA), "the kill came between the two disks"
    cbsd("bstart", vm).ok()  # recovery first: both disks back to the snapshot, then the boot
    assert holds(d, 0xAA) and holds(d2, 0xAA)


# --- a running Debian guest with its agent ------------------------------------------------

def ready(deb: Debian) -> Debian:
    """From the `ready` checkpoint, with its agent answering, asked directly (the clock
    helper cbsd starts gives up after its own wait; a loaded host may need longer): a
    deadline, not a fixed wait."""
    deb.start_from()
    deadline = time.monotonic() + 300
    while True:
        try:
            fsfreeze_status(deb, timeout=5)
            return deb
        except QemuError:
            assert time.monotonic() < deadline, "the guest agent never answered"
            time.sleep(0.5)


def fsfreeze_status(deb: Debian, timeout: float = 30) -> str:
    agent = Agent(str(deb.cbsd.system("deb") / "qga.sock"), timeout=timeout)
    try:
        return str(agent.call("guest-fsfreeze-status"))
    finally:
        agent.close()


def needs_recovery(deb: Debian, snap: str, tmp: Path) -> bool:
    """Whether the guest's ext4 root, as the snapshot holds it, needs its journal replayed
    (set while mounted; cleared only by an unmount or a freeze, which flushes the journal)."""
    raw = tmp / f"{snap}.raw"
    subprocess.run([os.environ.get("CBSD_QEMU_IMG", "qemu-img"), "convert", "-U", "-l",
                    f"snapshot.name=bsnapshot-{snap}", "-O", "raw",
                    str(disk(deb.cbsd, "deb")), str(raw)], check=True, capture_output=True)
    try:
        head = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True,
                              check=True).stdout
    finally:
        raw.unlink()
    features = next(ln for ln in head.splitlines() if ln.startswith("Filesystem features:"))
    return "needs_recovery" in features


def guard_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and b"cbsd.core.vm.fsfreeze" in proc_cmdline(int(p))]


def wait_writable(deb: Debian, timeout: float = 60) -> None:
    """A write in the guest completes (a frozen filesystem would hold it) within *timeout*."""
    r = deb.cbsd("bexec", "deb", "cmd=echo thawed > /var/tmp/after && sync && cat /var/tmp/after",
                 timeout=timeout)
    assert (r.code, r.out) == (0, "thawed\n"), r


def wait_thawed(deb: Debian, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (status := fsfreeze_status(deb)) != "thawed":
        assert time.monotonic() < deadline, f"the guest is still {status}"
        time.sleep(0.2)


@pytest.mark.debian
def test_a_running_guest_is_frozen_for_the_snapshot(deb: Debian, tmp_path: Path) -> None:
    ready(deb)
    try:
        row = deb.workload()[0]  # the SQLite writer runs throughout
        r = deb.cbsd("bsnapshot", "mode=create", "jname=deb", "name=frozen").ok()
        assert "application-consistent: the guest's filesystems were frozen" in r.out, r.out
        assert fsfreeze_status(deb) == "thawed"
        deb.wait_rows(past=row, what="the writer goes on after the snapshot")
        assert not needs_recovery(deb, "frozen", tmp_path), "the snapshot was not frozen"
        # Without the agent (stopped in the guest): crash-consistent, and says so; the
        # filesystem it holds was caught mounted (the contrast that makes the check above
        # mean something).
        deb.ssh("sudo systemctl stop qemu-guest-agent")
        r = deb.cbsd("bsnapshot", "mode=create", "jname=deb", "name=crash").ok()
        assert "crash-consistent: no guest agent answers" in r.out, r.out
        assert needs_recovery(deb, "crash", tmp_path)
    finally:
        deb.cbsd("bsnapshot", "mode=destroyall", "jname=deb").ok()


@pytest.mark.debian
def test_kill9_between_freeze_and_thaw_leaves_no_guest_frozen(deb: Debian) -> None:
    ready(deb)
    try:
        held = deb.cbsd.at_failpoint("bsnapshot:frozen", "bsnapshot", "mode=create",
                                     "jname=deb", "name=killed")
        assert fsfreeze_status(deb) == "frozen"
        held.kill9()
        # The guard cbsd started before the freeze thaws the guest: no other cbsd command
        # runs (bexec takes no lock, so no recovery).
        wait_thawed(deb)
        wait_writable(deb)
        deadline = time.monotonic() + 30
        while guard_pids():  # its work done, the guard ends
            assert time.monotonic() < deadline, "the guard lives on"
            time.sleep(0.1)
        # And if the guard dies too, the next locked command's recovery thaws the guest.
        held = deb.cbsd.at_failpoint("bsnapshot:frozen", "bsnapshot", "mode=create",
                                     "jname=deb", "name=killed2")
        assert fsfreeze_status(deb) == "frozen"
        guards = guard_pids()
        assert len(guards) == 1, guards
        os.kill(guards[0], 9)
        held.kill9()
        assert fsfreeze_status(deb) == "frozen"
        deb.cbsd("bsnapshot", "mode=create", "jname=deb", "name=after").ok()
        wait_thawed(deb, timeout=5)
        wait_writable(deb)
        assert names(deb.cbsd, "deb") == ["after"]  # the killed creates were undone
    finally:
        deb.cbsd("bsnapshot", "mode=destroyall", "jname=deb").ok()


def test_copies_carry_snapshots(cbsd: Cbsd, counter_vm: str,
                                                         tmp_path: Path) -> None:
    """bclone and bexport/bimport copy the images whole, snapshots with them (each copy can
    roll back)."""
    vm = counter_vm
    write(disk(cbsd, vm), 0xAA)
    cbsd("bsnapshot", "mode=create", vm, "name=s").ok()
    write(disk(cbsd, vm), 0xBB)
    cbsd("bclone", f"old={vm}", "new=copy").ok()
    cbsd("bexport", f"jname={vm}", f"out={tmp_path / 'vm.cbsd'}").ok()
    cbsd("bimport", f"in={tmp_path / 'vm.cbsd'}", "jname=imported").ok()
    for other in ("copy", "imported"):
        assert names(cbsd, other) == ["s"]
        cbsd("bsnapshot", "mode=rollback", other, "name=s").ok()
        assert holds(disk(cbsd, other), 0xAA)
    assert holds(disk(cbsd, vm), 0xBB)  # the original's disk is its own


@pytest.mark.twohost
def test_bmigrate_refuses_a_vm_with_snapshots(two, counter_image) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    joined(a, b)
    start_counter(a.cbsd, counter_image())
    a.cbsd("bsnapshot", "mode=create", "jname=vm1", "name=s").ok()
    a.cbsd("bmigrate", "jname=vm1", "node=b").fails(1, "disk snapshots (bsnapshot)")
    assert a.cbsd.status("vm1") == "On"
