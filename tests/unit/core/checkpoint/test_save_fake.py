"""Save's rollback (core/checkpoint/save.py) at each of its failure points, against the fake QEMU
(tests/unit/fakeqemu.py): a failpoint raising at each named step, a QMP command answering an
error at each step, and QEMU dying in the middle. Whatever failed: the guest runs again if it
was running (stays paused if it was paused), no checkpoint or temporary directory is left,
the intent file is gone and no disk snapshot of cbsd's stays in the image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cbsd.core.checkpoint import save as save_mod
from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.core.vm.recovery import INTENT
from cbsd.core.vm.states import TAG_PREFIX
from cbsd.errors import CbsdError, QemuError
from cbsd.failpoints import failpoint as real_failpoint
from cbsd.model import VMSpec
from cbsd.qemu import img
from cbsd.storage import ckpstore
from tests.unit.fakeqemu import PAYLOAD, FakeQemu

# Every failpoint of save() before its publish: a failure at any of them rolls back.
ROLLBACK_POINTS = ["save:stopped", "save:snapshotted", "save:migrating", "save:saved",
                   "save:verified"]


class Injected(CbsdError):
    pass


@pytest.fixture
def running(ctx: Context, vm1: VMSpec) -> Iterator[VM]:
    lifecycle.start(ctx, "vm1")
    with ctx.locked_vm("vm1", "test") as vm:
        yield vm


def fail_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """save's failpoint *point* raises (as a signal or a failing step would, there)."""

    def failpoint(name: str) -> None:
        real_failpoint(name)
        if name == point:
            raise Injected(f"injected at {name}")

    monkeypatch.setattr(save_mod, "failpoint", failpoint)


def checkpoint(vm: VM) -> Path:
    return vm.ctx.workdir.checkpoint(vm.jname, "c1")


def assert_rolled_back(vm: VM, fake: FakeQemu, *, state: str) -> None:
    wd = vm.ctx.workdir
    assert list(wd.checkpoints(vm.jname).iterdir()) == []  # neither c1 nor a temporary dir
    assert not list(wd.system(vm.jname).rglob(INTENT))
    assert [t for t in img.snapshots(Path(vm.paths.disks[0])) if t.startswith(TAG_PREFIX)] == []
    if state:
        assert vm.monitor().status() == state
        assert vm.status(mine=True).value in ("On", "Paused")
    else:
        assert not vm.alive()


def test_a_save_writes_the_stream_and_puts_the_guest_back(running: VM, fake: FakeQemu) -> None:
    mark = fake.mark()
    m = save_mod.save(running, checkpoint(running), name="c1", kind="checkpoint")
    cmds = fake.commands(mark)
    assert cmds.index("stop") < cmds.index("blockdev-snapshot-internal-sync") \
        < cmds.index("getfd") < cmds.index("migrate") < cmds.index("cont")
    assert [r["fd"] for r in fake.received()[mark:] if r["execute"] == "getfd"] == [True]
    assert (checkpoint(running) / ckpstore.MEMORY).read_bytes() == PAYLOAD
    assert [s.tag for s in m.disk_snapshots] == img.snapshots(Path(running.paths.disks[0]))
    assert m.was_running and running.monitor().status() == "running"
    assert not list(running.ctx.workdir.system("vm1").rglob(INTENT))


QEMU_10 = {"version": "10.0.0", "capabilities": ["background-snapshot", "x-ignore-shared",
                                                 "mapped-ram", "multifd"]}


def test_a_save_on_qemu_10_hands_an_fdset_and_uses_mapped_ram(
        ctx: Context, vm1: VMSpec, fake: FakeQemu) -> None:
    fake.script(**QEMU_10)
    lifecycle.start(ctx, "vm1")
    with ctx.locked_vm("vm1", "test") as vm:
        mark = fake.mark()
        m = save_mod.save(vm, checkpoint(vm), name="c1", kind="checkpoint")
        assert vm.monitor().status() == "running"
    reqs = fake.received()[mark:]
    (add,) = [r for r in reqs if r["execute"] == "add-fd"]
    assert add["fd"] and not [r for r in reqs if r["execute"] == "getfd"]
    (mig,) = [r for r in reqs if r["execute"] == "migrate"]
    assert mig["arguments"]["uri"].startswith("file:/dev/fdset/")
    assert {"capability": "mapped-ram", "state": True} in [
        c for r in reqs if r["execute"] == "migrate-set-capabilities"
        for c in r["arguments"]["capabilities"]]
    assert "remove-fd" in fake.commands(mark)  # the fdset released once QEMU is done
    assert m.migration["capabilities"] == ["mapped-ram", "multifd"]
    assert (checkpoint(vm) / ckpstore.MEMORY).read_bytes() == PAYLOAD


def test_a_failed_save_on_qemu_10_reactivates_a_paused_guests_disks_without_running_it(
        ctx: Context, vm1: VMSpec, fake: FakeQemu, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.script(**QEMU_10)
    lifecycle.start(ctx, "vm1", paused=True)
    fail_at(monkeypatch, "save:saved")  # after the migration completed: postmigrate
    with ctx.locked_vm("vm1", "test") as vm:
        mark = fake.mark()
        with pytest.raises(Injected):
            save_mod.save(vm, checkpoint(vm), name="c1", kind="checkpoint")
        cmds = fake.commands(mark)
        assert "blockdev-set-active" in cmds and "cont" not in cmds
        # vCPUs still stopped (QEMU stays in postmigrate), disks writable again.
        assert_rolled_back(vm, fake, state="postmigrate")


@pytest.mark.parametrize("point", ROLLBACK_POINTS)
def test_a_failure_at_each_step_resumes_the_guest(running: VM, fake: FakeQemu,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  point: str) -> None:
    fail_at(monkeypatch, point)
    mark = fake.mark()
    with pytest.raises(Injected, match=f"^injected at {point}$"):
        save_mod.save(running, checkpoint(running), name="c1", kind="checkpoint")
    assert "stop" in fake.commands(mark)
    assert_rolled_back(running, fake, state="running")


@pytest.mark.parametrize("point", ["save:stopped", "save:saved"])
def test_a_failure_leaves_a_paused_guest_paused(running: VM, fake: FakeQemu,
                                                monkeypatch: pytest.MonkeyPatch,
                                                point: str) -> None:
    running.monitor().cmd("stop")
    fail_at(monkeypatch, point)
    mark = fake.mark()
    with pytest.raises(Injected):
        save_mod.save(running, checkpoint(running), name="c1", kind="checkpoint")
    cmds = fake.commands(mark)
    if point == "save:saved":
        # After the completed migration (postmigrate) QEMU 7.2 can reactivate the disks only
        # by running the guest for a moment: cont, then stop at once.
        assert cmds[cmds.index("blockdev-set-active"):][:3] == ["blockdev-set-active", "cont",
                                                                "stop"]
    else:
        assert "stop" not in cmds and "cont" not in cmds  # it was paused: nothing to undo
    assert_rolled_back(running, fake, state="paused")


@pytest.mark.parametrize("command", ["stop", "blockdev-snapshot-internal-sync", "getfd",
                                     "migrate", "query-migrate"])
def test_qemu_refusing_each_step_rolls_back(running: VM, fake: FakeQemu, command: str) -> None:
    fake.fail(command, desc=f"no {command} today")
    with pytest.raises(QemuError, match=f"^vm1: QEMU refused {command}: no {command} today$"):
        save_mod.save(running, checkpoint(running), name="c1", kind="checkpoint")
    assert_rolled_back(running, fake, state="running")


@pytest.mark.parametrize("command", ["migrate", "query-migrate"])
def test_qemu_dying_mid_save_leaves_no_snapshot_and_reports_off(running: VM, fake: FakeQemu,
                                                                command: str) -> None:
    # The disk snapshot is in the image by then: the rollback deletes it with qemu-img.
    fake.fail(command, "die")
    with pytest.raises(QemuError, match=r"^vm1: QEMU exited while the checkpoint was being "
                                        r"written; the VM is Off$"):
        save_mod.save(running, checkpoint(running), name="c1", kind="checkpoint")
    assert_rolled_back(running, fake, state="")
