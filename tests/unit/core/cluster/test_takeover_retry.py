"""Which takeovers are due and retried (core/cluster/takeover.py): a takeover whose promote
went through but whose restore failed is resumed although promote dropped the replica and
the guard wrote the promoted definition's ha (none); a VM its owner left stopped is not
resumed; a refused takeover waits RETRY like a failed one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cbsd.core.cluster import config, guard, nodes, takeover
from cbsd.core.cluster.store import Put
from cbsd.core.cluster.takeover import Action, Standby, decide
from cbsd.core.vm.context import Context
from cbsd.storage.paths import Workdir
from tests.unit.core.cluster.fakestore import FakeStore
from tests.unit.core.cluster.test_takeover import Child, FakeReplicas, rec
from tests.unit.core.conftest import define


def test_a_failed_takeover_is_resumed_though_its_record_has_no_ha_any_more() -> None:
    # after promote: the guard's settle wrote "ha": null and the status of the stopped copy
    promoted = {"node": "b", "ha": None, "status": "Off", "takeover": "a"}
    assert decide({"v": (promoted, 9)}, {"b"}, "b", {}, 100.0, 2.0) == [Action("v", "a", 0)]


def test_a_vm_its_owner_left_stopped_is_not_taken_over() -> None:
    for status in ("Off", "unknown"):
        assert decide({"v": (rec("a", status=status), 5)}, {"b"}, "b", {"a": 0.0}, 100.0,
                      2.0) == []
    assert decide({"v": (rec("a"), 5)}, {"b"}, "b", {"a": 0.0}, 100.0, 2.0) == [
        Action("v", "a", 5)]


def test_a_resume_needs_no_replica_here(short_tmp: Any) -> None:
    s = FakeStore()
    s.txn([], [Put(nodes.VM + "v", json.dumps(
        {"node": "b", "ha": None, "status": "Off", "takeover": "a"}).encode())])
    started: list[Action] = []

    def spawn(a: Action) -> subprocess.Popen[bytes]:
        started.append(a)
        return Child()  # type: ignore[return-value]

    sb = Standby(Workdir(short_tmp), "b", 10, lambda m: None, clock=lambda: 0.0,
                 has_replica=lambda j: False, spawn=spawn)
    sb.round(nodes.snapshot(s))
    assert started == [Action("v", "a", 0)]


def test_a_refused_takeover_fails_so_it_waits_before_again(
        ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    define(ctx, "v")  # a VM of that name here: refused
    s = FakeStore()
    s.txn([], [Put(nodes.VM + "v", json.dumps(rec("a")).encode())])
    rev = s.get(nodes.VM + "v").mod_revision  # type: ignore[union-attr]
    wd = ctx.workdir
    config.folder(wd).mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(config, "load", lambda _wd: SimpleNamespace(node="b"))
    monkeypatch.setattr(config, "store", lambda _wd, _cfg: s)
    monkeypatch.setattr(guard, "install", lambda _ctx: None)
    monkeypatch.setattr(takeover, "replicas", lambda: FakeReplicas("ha-1"))
    assert takeover.main([str(wd.root), "v", "a", str(rev)]) == 1
    assert "bremove it here first" in config.keeper_log(wd).read_text()


def test_the_keeper_log_is_capped(short_tmp: Path) -> None:
    path = short_tmp / "keeper.log"
    for i in range(200):
        config.append_log(path, f"line {i:04d} " + "x" * 40, cap=1000)
    text = path.read_text()
    assert len(text) <= 1000 + 60 and text.endswith("line 0199 " + "x" * 40 + "\n")
    assert text.startswith("line ")  # whole lines only
