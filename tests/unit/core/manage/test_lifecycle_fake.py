"""bstart and bstop's orchestration against the fake QEMU (tests/unit/fakeqemu.py): the
launch (cold, paused, from a checkpoint), the QMP commands sent, the status after, and what
a QEMU that fails or dies during the start leaves (nothing: no process, no pid recorded, no
socket or pid file)."""

from __future__ import annotations

import os

import pytest

from cbsd.core.checkpoint import checkpoints, hibernate
from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import QemuError
from cbsd.model import Status, VMSpec
from cbsd.qemu import process
from cbsd.storage import ckpstore
from tests.unit.fakeqemu import FakeQemu


def status(ctx: Context) -> Status:
    return VM.load(ctx, "vm1").status()


def assert_nothing_left(ctx: Context, fake: FakeQemu) -> None:
    """No partial state: no fake QEMU lives, no pid recorded, no runtime file, status Off."""
    vm = VM.load(ctx, "vm1")
    assert not [p for p in fake.pids() if process.alive(p, vm.paths.qmp_sock)]
    assert ctx.inventory.runtime("vm1") == (0, 0)
    assert not os.path.exists(vm.paths.pidfile)
    assert not os.path.exists(vm.paths.qmp_sock)
    assert status(ctx) is Status.OFF


def test_start_launches_and_checks_the_run_state(ctx: Context, vm1: VMSpec,
                                                 fake: FakeQemu) -> None:
    assert lifecycle.start(ctx, "vm1") == "vm1: started"
    assert fake.commands() == ["query-status"]
    pid, _ = ctx.inventory.runtime("vm1")
    assert pid == fake.pids()[-1]
    vm = VM.load(ctx, "vm1")
    assert process.alive(pid, vm.paths.qmp_sock)
    assert process.read_pidfile(vm.paths.pidfile) == pid
    assert status(ctx) is Status.ON
    # The argv is cbsd's own: the fake holds the VM's disk open as QEMU would.
    held = process.open_files(pid)
    st = os.stat(vm.paths.disks[0])
    assert held is not None and (st.st_dev, st.st_ino) in held


def test_start_paused_leaves_it_paused(ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    assert lifecycle.start(ctx, "vm1", paused=True) == "vm1: started (paused)"
    assert b"-S\0" in process.cmdline(ctx.inventory.runtime("vm1")[0])
    assert fake.commands() == ["query-status"]
    assert status(ctx) is Status.PAUSED


def test_a_qemu_that_refuses_to_start_leaves_nothing(ctx: Context, vm1: VMSpec,
                                                     fake: FakeQemu) -> None:
    fake.script(launch="fail")
    with pytest.raises(QemuError, match=r"^QEMU failed to start: .*Could not open: fake"):
        lifecycle.start(ctx, "vm1")
    assert fake.pids() == []
    assert_nothing_left(ctx, fake)


def test_a_qemu_that_dies_before_serving_its_monitor_leaves_nothing(
        ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    fake.script(launch="die")
    with pytest.raises(QemuError, match=r"^vm1: cannot reach QEMU's monitor"):
        lifecycle.start(ctx, "vm1")
    assert len(fake.pids()) == 1  # it did start (and wrote its pid file) before it died
    assert_nothing_left(ctx, fake)


def test_a_qemu_in_the_wrong_state_after_launch_is_ended(ctx: Context, vm1: VMSpec,
                                                         fake: FakeQemu) -> None:
    fake.script(state="paused")  # a QEMU that did not start its vCPUs
    with pytest.raises(QemuError, match=r"^vm1: QEMU started but reports 'paused'$"):
        lifecycle.start(ctx, "vm1")
    assert fake.commands() == ["query-status"]
    assert_nothing_left(ctx, fake)


def test_a_qemu_that_dies_on_its_first_command_is_off_and_starts_again(
        ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    fake.fail("query-status", "die")
    with pytest.raises(QemuError, match=r"^vm1: lost QEMU's monitor during query-status"):
        lifecycle.start(ctx, "vm1")
    assert status(ctx) is Status.OFF
    assert lifecycle.start(ctx, "vm1") == "vm1: started"  # the 2nd query-status is answered
    assert status(ctx) is Status.ON


def test_stop_sends_the_power_button_and_forgets_the_process(ctx: Context, vm1: VMSpec,
                                                             fake: FakeQemu) -> None:
    lifecycle.start(ctx, "vm1", paused=True)
    mark = fake.mark()
    assert lifecycle.stop(ctx, "vm1") == "vm1: stopped (ACPI shutdown)"
    # Paused: thawed first, so the guest can see the button.
    assert fake.commands(mark)[-2:] == ["cont", "system_powerdown"]
    assert_nothing_left(ctx, fake)


def test_stop_noacpi_quits_qemu(ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    lifecycle.start(ctx, "vm1")
    mark = fake.mark()
    assert lifecycle.stop(ctx, "vm1", noacpi=True) == "vm1: powered off"
    assert "quit" in fake.commands(mark)
    assert_nothing_left(ctx, fake)


def test_start_from_a_checkpoint_loads_it_and_runs_the_guest(ctx: Context, vm1: VMSpec,
                                                             fake: FakeQemu) -> None:
    lifecycle.start(ctx, "vm1")
    checkpoints.create(ctx, "vm1", "c1", poweroff=True)
    assert status(ctx) is Status.OFF
    mark = fake.mark()
    assert lifecycle.start(ctx, "vm1", checkpoint="c1") == "vm1: restored from checkpoint c1"
    pid = ctx.inventory.runtime("vm1")[0]
    assert b"-incoming\0defer\0" in process.cmdline(pid)
    cmds = fake.commands(mark)
    loads = [r for r in fake.received()[mark:] if r["execute"] == "migrate-incoming"]
    assert [r["arguments"]["uri"] for r in loads] == ["fd:cbsd-load"]
    assert cmds.index("getfd") < cmds.index("migrate-incoming") < cmds.index("cont")
    assert status(ctx) is Status.ON


def test_a_qemu_that_dies_while_loading_a_checkpoint_leaves_nothing(
        ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    lifecycle.start(ctx, "vm1")
    checkpoints.create(ctx, "vm1", "c1", poweroff=True)
    fake.fail("migrate-incoming", "die")
    with pytest.raises(QemuError, match=r"^vm1: QEMU exited while loading the checkpoint c1"
                                        r".*; the VM is Off$"):
        lifecycle.start(ctx, "vm1", checkpoint="c1")
    assert_nothing_left(ctx, fake)
    assert ckpstore.has_manifest(ctx.workdir.checkpoint("vm1", "c1"))  # the state stays
    assert lifecycle.start(ctx, "vm1", checkpoint="c1") == "vm1: restored from checkpoint c1"


def test_start_of_a_suspended_vm_resumes_it_and_retires_the_image(
        ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    lifecycle.start(ctx, "vm1")
    hibernate.suspend(ctx, "vm1")
    image = ctx.workdir.hibernation("vm1")
    assert status(ctx) is Status.SUSPENDED and ckpstore.has_manifest(image)
    (tag,) = [s.tag for s in ckpstore.read_manifest(image).disk_snapshots]
    mark = fake.mark()
    assert lifecycle.start(ctx, "vm1") == "vm1: resumed from hibernation"
    cmds = fake.commands(mark)
    assert cmds.index("migrate-incoming") < cmds.index("cont")
    # Retired once loaded: its disk snapshot released through QEMU, the image gone.
    assert [r["arguments"]["name"] for r in fake.received()[mark:]
            if r["execute"] == "blockdev-snapshot-delete-internal-sync"] == [tag]
    assert not ckpstore.has_manifest(image)
    assert status(ctx) is Status.ON
