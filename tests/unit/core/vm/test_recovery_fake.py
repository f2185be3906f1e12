"""recover() end to end (core/vm/recovery.py), one test per row of plan()'s table, against the
fake QEMU (tests/unit/fakeqemu.py) left in the run state an interrupted command leaves: the
QMP commands recovery sends, the process (ended or not), and the files left. plan() itself is
tested as a table in tests/unit/core/vm/test_recovery.py; here its steps are carried out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbsd.core.checkpoint import save as save_mod
from cbsd.core.manage import lifecycle
from cbsd.core.vm import machine as vm_mod
from cbsd.core.vm import recovery
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.core.vm.recovery import INTENT
from cbsd.core.vm.states import TAG_PREFIX
from cbsd.errors import QemuError
from cbsd.model import VMSpec
from cbsd.qemu import img, process
from cbsd.storage import ckpstore
from tests.unit.fakeqemu import FakeQemu

ORPHAN = f"{TAG_PREFIX}c1-0123456789ab"  # the disk snapshot an interrupted save took


def launch(ctx: Context, fake: FakeQemu, state: str) -> int:
    """A QEMU of vm1 in run state *state*; its pid."""
    fake.script(state=state)
    vm = VM.load(ctx, "vm1")
    vm.launch(ram_file=False)
    vm.close()
    return vm.pid


def interrupted_save(ctx: Context, intent: str) -> Path:
    """What a save killed after its migration leaves: its temporary directory with the run
    state to return to, and its disk snapshot in the image (taken through QEMU)."""
    vm = VM.load(ctx, "vm1")
    vm.monitor().cmd("blockdev-snapshot-internal-sync", device="disk0", name=ORPHAN)
    vm.close()
    tmp = ckpstore.new_tmpdir(ctx.workdir.checkpoint("vm1", "c1"))
    (tmp / INTENT).write_text(intent)
    return tmp


def hibernate(ctx: Context, *, keep_running: bool) -> Path:
    """A published hibernation image of vm1 (a real save, QEMU left as *keep_running* says)."""
    image = ctx.workdir.hibernation("vm1")
    with ctx.locked_vm("vm1", "test") as vm:
        save_mod.save(vm, image, name="hibernation", kind="hibernation",
                      keep_running=keep_running)
    assert ckpstore.has_manifest(image)
    return image


def recover(ctx: Context, fake: FakeQemu) -> list[str]:
    """Run recovery as every locked command does; the commands it sent."""
    mark = fake.mark()
    with ctx.locked_vm("vm1", "test"):
        pass
    return fake.commands(mark)


def qemu_state(ctx: Context) -> str:
    vm = VM.load(ctx, "vm1")
    try:
        return vm.monitor().status()
    finally:
        vm.close()


def disk_tags(ctx: Context) -> list[str]:
    return img.snapshots(Path(VM.load(ctx, "vm1").paths.disks[0]))


def test_kill_a_qemu_that_never_got_its_state(ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    pid = launch(ctx, fake, "inmigrate")  # a restore killed before the load finished
    assert recover(ctx, fake) == ["query-status"]  # SIGKILL: no 'quit'
    vm = VM.load(ctx, "vm1")
    assert not process.alive(pid, vm.paths.qmp_sock)
    assert ctx.inventory.runtime("vm1") == (0, 0)
    assert not os.path.exists(vm.paths.pidfile) and not os.path.exists(vm.paths.qmp_sock)


def test_power_off_a_qemu_whose_guest_is_in_the_hibernation_image(
        ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    pid = launch(ctx, fake, "running")
    image = hibernate(ctx, keep_running=False)  # a bsuspend killed before it ended QEMU
    assert qemu_state(ctx) == "postmigrate"
    assert recover(ctx, fake) == ["query-status", "quit"]
    assert not process.alive(pid, VM.load(ctx, "vm1").paths.qmp_sock)
    assert ckpstore.has_manifest(image)  # the image holds the guest: kept
    assert disk_tags(ctx) == [s.tag for s in ckpstore.read_manifest(image).disk_snapshots]
    assert VM.load(ctx, "vm1").status().value == "Suspended"


def test_drop_an_image_the_guest_ran_past(ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    pid = launch(ctx, fake, "running")
    image = hibernate(ctx, keep_running=True)  # an image beside a running guest: stale
    (tag,) = disk_tags(ctx)
    cmds = recover(ctx, fake)
    assert cmds == ["query-status", "blockdev-snapshot-delete-internal-sync"]
    assert [r["arguments"]["name"] for r in fake.received()
            if r["execute"] == "blockdev-snapshot-delete-internal-sync"] == [tag]
    assert not ckpstore.has_manifest(image)
    assert disk_tags(ctx) == []
    assert process.alive(pid, VM.load(ctx, "vm1").paths.qmp_sock)
    assert qemu_state(ctx) == "running"


@pytest.mark.parametrize("state", ["postmigrate", "paused"])
def test_cont_a_guest_an_interrupted_save_stopped(ctx: Context, vm1: VMSpec, fake: FakeQemu,
                                                  state: str) -> None:
    launch(ctx, fake, state)
    tmp = interrupted_save(ctx, "running")
    cmds = recover(ctx, fake)
    assert cmds[:2] == ["query-status", "cont"]
    assert "stop" not in cmds
    assert qemu_state(ctx) == "running"
    assert not tmp.exists()
    assert ORPHAN not in disk_tags(ctx)  # swept, through QEMU (it holds the image)
    assert "blockdev-snapshot-delete-internal-sync" in cmds


def test_cont_then_stop_a_paused_guest_after_a_completed_migration(
        ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    launch(ctx, fake, "postmigrate")
    tmp = interrupted_save(ctx, "paused")
    cmds = recover(ctx, fake)
    assert cmds[:3] == ["query-status", "cont", "stop"]
    assert qemu_state(ctx) == "paused"
    assert not tmp.exists()
    assert ORPHAN not in disk_tags(ctx)


def test_nothing_to_do_for_a_running_guest(ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    pid = launch(ctx, fake, "running")
    assert recover(ctx, fake) == ["query-status"]
    assert qemu_state(ctx) == "running"
    assert ctx.inventory.runtime("vm1")[0] == pid


def test_a_qemu_whose_pid_was_never_recorded_is_adopted(ctx: Context, vm1: VMSpec,
                                                       fake: FakeQemu) -> None:
    pid = launch(ctx, fake, "running")
    ctx.inventory.set_runtime("vm1", 0)  # bstart killed between the launch and the record
    recover(ctx, fake)
    assert ctx.inventory.runtime("vm1")[0] == pid


def test_a_dead_holder_makes_recovery_find_qemu_by_its_command_line(
        ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    pid = launch(ctx, fake, "paused")
    ctx.inventory.set_runtime("vm1", 0)
    os.unlink(VM.load(ctx, "vm1").paths.pidfile)  # not even the pid file points at it
    vm = VM.load(ctx, "vm1")
    recovery.recover(vm, died="pid 1 (bstart), gone")
    vm.close()
    assert ctx.inventory.runtime("vm1")[0] == pid


def test_a_qemu_that_does_not_answer_is_refused_and_bstop_noacpi_ends_it(
        ctx: Context, vm1: VMSpec, fake: FakeQemu, monkeypatch: pytest.MonkeyPatch) -> None:
    pid = launch(ctx, fake, "running")
    fake.fail("query-status", "hang")  # wedged: it takes the request and never answers
    vm = VM.load(ctx, "vm1")
    vm.monitor(timeout=0.5)  # the session recovery then uses: short, for the test's sake
    with pytest.raises(QemuError, match=rf"^vm1: QEMU \(pid {pid}\) does not answer its "
                                        r"monitor \(.*\); 'cbsd bstop jname=vm1 noacpi=1' "
                                        r"powers it off$"):
        recovery.recover(vm)
    vm.close()
    assert process.alive(pid, vm.paths.qmp_sock)  # recovery ends nothing it cannot judge
    # The way out: 'quit' cannot get through either (the monitor serves the hung session),
    # so QEMU is killed once QUIT_TIMEOUT has passed.
    monkeypatch.setattr(vm_mod, "QUIT_TIMEOUT", 0.5)
    assert lifecycle.stop(ctx, "vm1", noacpi=True) == "vm1: powered off"
    assert not process.alive(pid, vm.paths.qmp_sock)
    assert ctx.inventory.runtime("vm1") == (0, 0)
    assert not os.path.exists(vm.paths.pidfile) and not os.path.exists(vm.paths.qmp_sock)
