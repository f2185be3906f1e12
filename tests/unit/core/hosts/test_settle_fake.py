"""The settles of an interrupted bmove and bmigrate (core/vm/moving.py: settle and settle_migrate,
once in core/hosts/move.py and migrate.py), reached as every command reaches them: through
recovery under the VM's lock. The node is a fake (tests/unit/fakenode.py: an ssh on the PATH and
a scripted cbsd), so each answer a node can give -- aborted, committed, registered, absent,
garbage, unreachable -- is met by the real Node code; the VM's QEMU is the fake QEMU
(tests/unit/fakeqemu.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import StateError
from cbsd.model import VMSpec
from cbsd.qemu import process
from cbsd.storage.atomic import write_atomic
from tests.unit.fakenode import FakeNode
from tests.unit.fakeqemu import FakeQemu

ABORT = "bimport mode=abort id=st-1"
STATUS = "bmigrate mode=status jname=vm1"


@pytest.fixture
def node(short_tmp: Path, ctx: Context, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNode]:
    fn = FakeNode(short_tmp / "node")
    for k, v in fn.env().items():
        monkeypatch.setenv(k, v)
    ctx.inventory.add_node("n1", "n1.example", 22)
    ctx.inventory.add_node("n2", "unreachable", 22)
    yield fn


def intend(ctx: Context, record: dict[str, object]) -> Path:
    """The intent file a cut-off bmove/bmigrate left (written as they write it)."""
    path = ctx.workdir.moving("vm1")
    write_atomic(path, json.dumps(record).encode())
    return path


def settle(ctx: Context) -> None:
    with ctx.locked_vm("vm1", "test"):
        pass


def gone(ctx: Context) -> bool:
    """vm1 was removed here: no entry, no files."""
    wd = ctx.workdir
    return ctx.inventory.get("vm1") is None and not wd.system("vm1").exists() \
        and not wd.vm_dir("vm1").exists()


# --- bmove ---------------------------------------------------------------------------------

def test_bmove_cut_off_before_staging_keeps_the_vm(ctx: Context, vm1: VMSpec,
                                                   node: FakeNode) -> None:
    intent = intend(ctx, {"node": "n1", "id": None})
    settle(ctx)
    assert not intent.exists() and node.calls() == []
    assert ctx.inventory.get("vm1") is not None


def test_bmove_aborted_on_the_node_keeps_the_vm(ctx: Context, vm1: VMSpec,
                                                node: FakeNode) -> None:
    node.answer(ABORT, out="aborted\n")
    intent = intend(ctx, {"node": "n1", "id": "st-1"})
    settle(ctx)
    assert node.calls() == [ABORT]
    assert not intent.exists() and ctx.inventory.get("vm1") is not None


def test_bmove_committed_on_the_node_finishes_the_move(ctx: Context, vm1: VMSpec,
                                                       node: FakeNode) -> None:
    node.answer(ABORT, out="committed vm1\n")
    intend(ctx, {"node": "n1", "id": "st-1"})
    with pytest.raises(StateError, match=r"^vm1: it was moved to node n1 \(an interrupted "
                                         r"bmove was completed\): use node=n1$"):
        settle(ctx)
    assert node.calls() == [ABORT]
    assert gone(ctx)


@pytest.mark.parametrize(("node_name", "why"), [
    ("n2", "node n2: cannot reach unreachable: ssh: connect to host unreachable port 22: "
           "Connection refused"),
    ("n1", "node n1: its answer to bimport mode=abort is not what cbsd expects"),
])
def test_bmove_without_a_clear_answer_holds_the_vm(ctx: Context, vm1: VMSpec, node: FakeNode,
                                                   node_name: str, why: str) -> None:
    node.answer(ABORT, out="what?\n")
    intent = intend(ctx, {"node": node_name, "id": "st-1"})
    with pytest.raises(StateError, match=rf"^vm1: an interrupted bmove to node {node_name} "
                                         rf"cannot be settled until the node answers "
                                         rf"\({why}"):
        settle(ctx)
    assert intent.exists() and ctx.inventory.get("vm1") is not None


def test_bmove_whose_commit_never_went_out_settles_without_the_node(
        ctx: Context, vm1: VMSpec, node: FakeNode) -> None:
    intent = intend(ctx, {"node": "n2", "id": "st-1", "commit": "not sent"})
    settle(ctx)
    assert not intent.exists() and ctx.inventory.get("vm1") is not None


def test_bmove_to_a_node_no_longer_known(ctx: Context, vm1: VMSpec, node: FakeNode) -> None:
    intent = intend(ctx, {"node": "gone", "id": "st-1"})
    with pytest.raises(StateError, match=r"^vm1: an interrupted bmove to node gone, which is "
                                         r"no longer known here, may have been committed"):
        settle(ctx)
    assert intent.exists()
    intend(ctx, {"node": "gone", "id": "st-1", "commit": "not sent"})
    settle(ctx)
    assert not intent.exists() and ctx.inventory.get("vm1") is not None


# --- bmigrate ------------------------------------------------------------------------------

def running_vm(ctx: Context) -> int:
    lifecycle.start(ctx, "vm1")
    return ctx.inventory.runtime("vm1")[0]


def test_bmigrate_registered_on_the_node_ends_the_copy_here(
        ctx: Context, vm1: VMSpec, node: FakeNode, fake: FakeQemu) -> None:
    pid = running_vm(ctx)
    qmp = VM.load(ctx, "vm1").paths.qmp_sock
    node.answer(STATUS, out="registered\n")
    intend(ctx, {"node": "n1", "live": True, "ssh": []})
    with pytest.raises(StateError, match=r"^vm1: it was migrated to node n1 \(an interrupted "
                                         r"bmigrate was completed\): use node=n1$"):
        settle(ctx)
    assert node.calls() == [STATUS]
    assert not process.alive(pid, qmp)
    assert gone(ctx)


def test_bmigrate_absent_on_the_node_resumes_the_vm_here(
        ctx: Context, vm1: VMSpec, node: FakeNode, fake: FakeQemu) -> None:
    # Cut off after the migration completed: stopped, disks inactive, its mirror target in.
    fake.script(state="postmigrate", added=["mig-disk0"])
    vm = VM.load(ctx, "vm1")
    vm.launch(ram_file=False)
    vm.close()
    node.answer(STATUS, out="absent\n")
    intent = intend(ctx, {"node": "n1", "live": True, "ssh": []})
    mark = fake.mark()
    settle(ctx)
    cmds = fake.commands(mark)
    assert [r["arguments"] for r in fake.received()[mark:] if r["execute"] == "blockdev-del"] \
        == [{"node-name": "mig-disk0"}]
    # The mirror target deleted, then the guest resumed by the settle itself (recovery's
    # own plan then finds it running: no stop).
    assert cmds == ["query-block-jobs", "query-named-block-nodes", "blockdev-del",
                    "query-migrate-capabilities", "query-status", "cont", "query-status"]
    assert not intent.exists()
    assert VM.load(ctx, "vm1").status().value == "On"


def test_bmigrate_with_the_node_unreachable_holds_the_vm(
        ctx: Context, vm1: VMSpec, node: FakeNode, fake: FakeQemu) -> None:
    pid = running_vm(ctx)
    intent = intend(ctx, {"node": "n2", "live": True, "ssh": []})
    mark = fake.mark()
    with pytest.raises(StateError, match=r"^vm1: an interrupted bmigrate to node n2 cannot be "
                                         r"settled until the node answers \(node n2: cannot "
                                         r"reach unreachable"):
        settle(ctx)
    assert intent.exists()
    assert fake.commands(mark) == []  # QEMU left alone
    assert process.alive(pid, VM.load(ctx, "vm1").paths.qmp_sock)
