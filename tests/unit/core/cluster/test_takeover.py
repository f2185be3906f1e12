"""Takeover on the standby (core/cluster/takeover.py): the decision as a table, the round that
starts one child per VM, and the child's work -- the compare-and-swap, promote (a fake
standing in for core/cluster/replica.py's), the restore -- against the in-memory store and
the fake QEMU."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from cbsd.core.checkpoint import checkpoints
from cbsd.core.cluster import nodes, owner
from cbsd.core.cluster.store import Put
from cbsd.core.cluster.takeover import Action, Standby, decide, take
from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import StateError
from cbsd.storage.paths import Workdir
from tests.unit.core.cluster.fakestore import FakeStore
from tests.unit.core.conftest import define

HA_B = {"node": "b", "interval": 30}


def rec(node: str, ha: dict[str, Any] | None = HA_B, **more: Any) -> dict[str, Any]:
    return {"node": node, "status": "On", **({"ha": ha} if ha else {}), **more}


@pytest.mark.parametrize(("records", "up", "gone", "now", "due"), [
    # the owner up: nothing
    ({"v": (rec("a"), 5)}, {"a", "b"}, {}, 100.0, []),
    # the owner just seen gone: wait the margin
    ({"v": (rec("a"), 5)}, {"b"}, {}, 100.0, []),
    ({"v": (rec("a"), 5)}, {"b"}, {"a": 99.0}, 100.0, []),
    # gone for the margin: take it, at the revision read
    ({"v": (rec("a"), 5)}, {"b"}, {"a": 98.0}, 100.0, [Action("v", "a", 5)]),
    # not this node's to take: another standby, no HA, or this node owns it
    ({"v": (rec("a", {"node": "c"}), 5)}, {"b"}, {"a": 0.0}, 100.0, []),
    ({"v": (rec("a", None), 5)}, {"b"}, {"a": 0.0}, 100.0, []),
    ({"v": (rec("b"), 5)}, {"b"}, {"a": 0.0}, 100.0, []),
    # a takeover cut short (the record names this node, "takeover" kept): resume it
    ({"v": (rec("b", takeover="a"), 7)}, {"b"}, {}, 100.0, [Action("v", "a", 0)]),
])
def test_the_standby_takes_over_once_the_owner_stayed_gone_for_the_margin(
        records: dict[str, tuple[dict[str, Any], int]], up: set[str], gone: dict[str, float],
        now: float, due: list[Action]) -> None:
    assert decide(records, up, "b", dict(gone), now, 2.0) == due


def test_an_owner_back_up_is_forgotten_so_blips_never_add_up() -> None:
    gone = {"a": 90.0}
    assert decide({"v": (rec("a"), 5)}, {"a", "b"}, "b", gone, 100.0, 2.0) == []
    assert gone == {}
    assert decide({"v": (rec("a"), 5)}, {"b"}, "b", gone, 101.0, 2.0) == []
    assert gone == {"a": 101.0}


class Child:
    def __init__(self) -> None:
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


def _snap(s: FakeStore) -> nodes.Snapshot:
    return nodes.snapshot(s)


def test_one_child_per_takeover_and_a_failed_one_waits_before_again(
        short_tmp: Any) -> None:
    s = FakeStore()
    s.txn([], [Put(nodes.VM + "v", json.dumps(rec("a")).encode()),
               Put(nodes.VM + "nore", json.dumps(rec("a")).encode())])
    started: list[Action] = []
    children: list[Child] = []

    def spawn(a: Action) -> subprocess.Popen[bytes]:
        started.append(a)
        children.append(Child())
        return children[-1]  # type: ignore[return-value]

    now = [0.0]
    sb = Standby(Workdir(short_tmp), "b", 10, lambda m: None, clock=lambda: now[0],
                 has_replica=lambda j: j == "v", spawn=spawn)
    for now[0] in (0.0, 1.0, 2.0, 3.0, 4.0):
        sb.round(_snap(s))
    assert [a.jname for a in started] == ["v"]  # once, and never "nore" (no replica)
    children[0].code = 1  # it failed
    now[0] = 5.0
    sb.round(_snap(s))
    now[0] = 20.0
    sb.round(_snap(s))
    assert len(started) == 1
    now[0] = 36.0
    sb.round(_snap(s))
    assert len(started) == 2


class FakeReplicas:
    """promote() as HA.md fixes it: the VM in this node's inventory with the replica's
    checkpoint, whose name it returns (here made by starting the VM and checkpointing it
    powered off, the first time; idempotent after). Counts its calls."""

    def __init__(self, checkpoint: str) -> None:
        self.checkpoint = checkpoint
        self.promoted = 0

    def latest(self, wd: Workdir, jname: str) -> object | None:
        return {"generation": 1}

    def promote(self, ctx: Context, jname: str) -> str:
        self.promoted += 1
        if ctx.inventory.get(jname) is None:
            define(ctx, jname)
            lifecycle.start(ctx, jname)
            checkpoints.create(ctx, jname, self.checkpoint, poweroff=True)
            assert not VM.load(ctx, jname).alive()
        return self.checkpoint


@pytest.fixture
def replica_here(ctx: Context) -> FakeReplicas:
    return FakeReplicas("ha-1")


def test_the_takeover_swaps_the_record_promotes_and_restores_running(
        ctx: Context, replica_here: FakeReplicas) -> None:
    s = FakeStore()
    s.txn([], [Put(nodes.VM + "v", json.dumps(rec("a")).encode())])
    rev = s.get(nodes.VM + "v").mod_revision  # type: ignore[union-attr]
    msg = take(ctx, s, "b", Action("v", "a", rev), replica_here)
    assert "taken over from node a" in msg
    assert VM.load(ctx, "v").alive() and replica_here.promoted == 1
    got = s.get(nodes.VM + "v").json()  # type: ignore[union-attr]
    assert got["node"] == "b" and "takeover" not in got and got["taken_from"] == "a"


def test_the_old_owner_may_only_remove_the_copy_a_takeover_left_there() -> None:
    s = FakeStore()
    s.txn([], [Put(nodes.VM + "v", json.dumps(rec("b", taken_from="a")).encode()),
               Put(nodes.VM + "w", json.dumps(rec("b", taken_from="c")).encode())])
    for what in ("bstart", "bset", "bcheckpoint"):
        with pytest.raises(owner.NotOwner):
            owner.claim_or_check(s, "a", "v", what)
    assert owner.claim_or_check(s, "a", "v", "bremove") is False  # runs, writes nothing
    owner.settle(s, "a", "v", "bremove", exists=False, facts={})
    assert s.get(nodes.VM + "v").json()["node"] == "b"  # type: ignore[union-attr]
    with pytest.raises(owner.NotOwner):
        owner.claim_or_check(s, "a", "w", "bremove")  # not taken from a: a has no copy to drop


def test_no_takeover_when_the_record_changed_or_the_owner_came_back(
        ctx: Context, replica_here: FakeReplicas) -> None:
    s = FakeStore()
    s.txn([], [Put(nodes.VM + "v", json.dumps(rec("a")).encode())])
    rev = s.get(nodes.VM + "v").mod_revision  # type: ignore[union-attr]
    lease = s.grant(10)
    s.txn([], [Put(nodes.ALIVE + "a", b"{}", lease)])  # a renewed in the meantime
    with pytest.raises(StateError, match="came back"):  # a failure: retried after RETRY
        take(ctx, s, "b", Action("v", "a", rev), replica_here)
    s.revoke(lease)
    s.txn([], [Put(nodes.VM + "v", json.dumps(rec("a", last="bset")).encode())])
    with pytest.raises(StateError, match="changed since"):
        take(ctx, s, "b", Action("v", "a", rev), replica_here)
    assert replica_here.promoted == 0 and ctx.inventory.get("v") is None
    assert s.get(nodes.VM + "v").json()["node"] == "a"  # type: ignore[union-attr]


def test_a_takeover_cut_short_is_resumed_without_a_second_swap(
        ctx: Context, replica_here: FakeReplicas) -> None:
    s = FakeStore()
    # the child died after the swap: the record names b with "takeover" kept
    s.txn([], [Put(nodes.VM + "v", json.dumps(rec("b", takeover="a")).encode())])
    take(ctx, s, "b", Action("v", "a", 0), replica_here)
    assert VM.load(ctx, "v").alive()
    # and once more (it died after the restore): nothing restarts, the marker goes
    s.txn([], [Put(nodes.VM + "v", json.dumps(rec("b", takeover="a")).encode())])
    take(ctx, s, "b", Action("v", "a", 0), replica_here)
    assert VM.load(ctx, "v").alive() and replica_here.promoted == 2
    assert "takeover" not in s.get(nodes.VM + "v").json()  # type: ignore[union-attr]


def test_no_takeover_over_a_vm_of_the_same_name_here(
        ctx: Context, replica_here: FakeReplicas) -> None:
    define(ctx, "v")  # say, the copy this node kept when the VM was taken from it once
    s = FakeStore()
    s.txn([], [Put(nodes.VM + "v", json.dumps(rec("a")).encode())])
    rev = s.get(nodes.VM + "v").mod_revision  # type: ignore[union-attr]
    with pytest.raises(StateError, match="bremove it here first"):
        take(ctx, s, "b", Action("v", "a", rev), replica_here)
    assert replica_here.promoted == 0
    assert s.get(nodes.VM + "v").json()["node"] == "a"  # type: ignore[union-attr]


def test_a_damaged_replica_stops_only_its_own_takeover(short_tmp: Any) -> None:
    wd = Workdir(short_tmp)
    bad = wd.root / "cluster" / "replicas" / "v"
    bad.mkdir(parents=True)
    (bad / "replica.json").write_text("{not json")
    log: list[str] = []
    sb = Standby(wd, "b", 10, log.append)
    assert sb.has_replica("v") is False and "unreadable" in log[0]
    assert sb.has_replica("w") is False  # none at all
