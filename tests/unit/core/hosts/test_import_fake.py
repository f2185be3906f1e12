"""bimport's two-phase registration (core/hosts/transfer.py import_/commit/abort,
core/hosts/staging.py), as bmove drives it on a node: an archive of a VM with a checkpoint, made
on one workdir with the fake QEMU (tests/unit/fakeqemu.py), staged on another, then committed or
aborted. What is asserted is what bmove's settle relies on: a commit registers the VM with its
disk, its checkpoint and the checkpoint's disk snapshot; a retried commit and a late abort both
answer 'committed' instead of importing twice or dropping it; an abort before the commit leaves
nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbsd.core.checkpoint import checkpoints
from cbsd.core.hosts import staging, transfer
from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import StateError
from cbsd.model import VMSpec
from cbsd.qemu import img
from cbsd.storage import ckpstore
from cbsd.storage.paths import Workdir
from tests.unit.fakeqemu import PAYLOAD, FakeQemu


@pytest.fixture
def archive(ctx: Context, vm1: VMSpec, short_tmp: Path) -> Path:
    """vm1 with checkpoint c1 (saved, then powered off), exported."""
    lifecycle.start(ctx, "vm1")
    checkpoints.create(ctx, "vm1", "c1", poweroff=True)
    path = short_tmp / "vm1.img"
    with path.open("wb") as out:
        assert transfer.export(ctx, "vm1", lambda: out, None) == "vm1: exported (1 saved state)"
    return path


@pytest.fixture
def there(short_tmp: Path, fake: FakeQemu) -> Context:
    """The node's workdir (the same fake QEMU: the same host, as far as bimport checks)."""
    return Context(Workdir(short_tmp / "node"))


def stage(there: Context, archive: Path) -> str:
    with archive.open("rb") as inp:
        jname, ident = transfer.import_(there, inp, None, stage=True)
    assert jname == "vm1" and ident
    return ident


def test_staged_is_not_registered_until_the_commit(there: Context, archive: Path) -> None:
    ident = stage(there, archive)
    assert there.inventory.get("vm1") is None
    assert (staging.staged(there, ident) / staging.STAGED).read_text() == "vm1"
    assert transfer.commit(there, ident) == "vm1"
    spec = there.inventory.get("vm1")
    assert spec is not None
    wd = there.workdir
    c1 = wd.checkpoint("vm1", "c1")
    assert (c1 / ckpstore.MEMORY).read_bytes() == PAYLOAD
    tags = [s.tag for s in ckpstore.read_manifest(c1).disk_snapshots]
    assert img.snapshots(Path(VM.load(there, "vm1").paths.disks[0])) == tags
    assert not staging.staged(there, ident).exists()
    # The imported VM runs there.
    assert lifecycle.start(there, "vm1") == "vm1: started"


def test_a_retried_commit_and_a_late_abort_answer_committed(there: Context,
                                                            archive: Path) -> None:
    ident = stage(there, archive)
    assert transfer.commit(there, ident) == "vm1"
    assert transfer.commit(there, ident) == "vm1"  # not imported twice
    assert transfer.abort(there, ident) == "committed vm1"  # not dropped
    assert there.inventory.names() == ["vm1"]


def test_an_abort_before_the_commit_leaves_nothing(there: Context, archive: Path) -> None:
    ident = stage(there, archive)
    assert transfer.abort(there, ident) == "aborted"
    assert there.inventory.get("vm1") is None
    assert not staging.staged(there, ident).exists()
    assert not there.workdir.system("vm1").exists() and not there.workdir.vm_dir("vm1").exists()
    with pytest.raises(StateError):
        transfer.commit(there, ident)  # nothing left to commit
