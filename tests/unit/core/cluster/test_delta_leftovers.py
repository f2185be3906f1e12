"""Disk deltas (core/cluster/delta.py) on the fake QEMU: what a replication cut short left in
QEMU (a cbsd-ha-delta-* node: killed between prepare and close, or its close failed) is
removed by the next prepare, so its blockdev-add of the same name does not fail."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cbsd.core.cluster import delta, ship
from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import QemuError, QmpCommandError
from tests.unit.core.conftest import define
from tests.unit.fakeqemu import FakeQemu


def nodes(vm: VM) -> list[str]:
    return [n["node-name"] for n in vm.monitor().cmd("query-named-block-nodes", flat=True)]


def test_prepare_removes_the_delta_nodes_a_replication_cut_short_left(
        ctx: Context, fake: FakeQemu, tmp_path: Path) -> None:
    define(ctx, "vm")
    fake.script(added=[f"{delta.NODE}0", f"{delta.NODE}1"])  # left in QEMU, as if killed
    lifecycle.start(ctx, "vm")
    vm = VM.load(ctx, "vm")
    assert f"{delta.NODE}0" in nodes(vm)
    for base in (None, 3):
        plan = delta.prepare(vm, tmp_path, 4, base)
        assert not any(n.startswith(delta.NODE) for n in nodes(vm)), base
        assert plan.added == [] and plan.deltas == {}  # no bitmap of generation 3 here
        # left again (the next round of the loop: prepare with a base)
        vm.monitor().cmd("blockdev-add", driver="qcow2", **{"node-name": f"{delta.NODE}0"},
                         file={"driver": "file", "filename": str(tmp_path / "x")})


def test_a_close_that_fails_does_not_skip_dropping_the_new_bitmap(
        ctx: Context, fake: FakeQemu, monkeypatch: pytest.MonkeyPatch) -> None:
    define(ctx, "vm")
    lifecycle.start(ctx, "vm")
    vm = VM.load(ctx, "vm")
    dropped: list[int] = []

    def fails(*_: object) -> None:
        raise QmpCommandError("vm", "blockdev-del", "GenericError", "Node is in use")

    monkeypatch.setattr(delta, "prepare", lambda *_: (_ for _ in ()).throw(QemuError("x")))
    monkeypatch.setattr(delta, "close", fails)
    monkeypatch.setattr(delta, "drop", lambda _vm, gen: dropped.append(gen))
    peer = SimpleNamespace(name="b", call=lambda argv: '{"generation": null}')
    with pytest.raises(QemuError):
        ship._replicate_held(vm, peer, "a")  # type: ignore[arg-type]
    assert dropped == [1]
