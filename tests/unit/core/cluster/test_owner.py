"""The ownership rules (core/cluster/owner.py) against the fake store."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from cbsd.core.cluster import owner
from cbsd.core.cluster.nodes import VM
from cbsd.core.cluster.store import ClusterUnreachable
from cbsd.core.vm.context import Context
from cbsd.core.vm.lock import is_held
from cbsd.errors import BusyError
from cbsd.storage.paths import Workdir
from tests.unit.core.cluster.fakestore import FakeStore


def facts(exists: bool = True) -> Any:
    return lambda: (exists, {"ram": 512 << 20, "cpus": 1, "status": "Off"})


def test_a_vm_nobody_owns_is_claimed_by_its_first_command() -> None:
    s = FakeStore()
    with owner.guarded(s, "a", "vm1", "bcreate", facts()):
        pass
    rec = s.kvs[VM + "vm1"].json()
    assert rec["node"] == "a" and rec["ram"] == 512 << 20 and rec["status"] == "Off"


def test_another_node_cannot_change_it_and_nothing_runs() -> None:
    s = FakeStore()
    with owner.guarded(s, "a", "vm1", "bcreate", facts()):
        pass
    before = s.kvs[VM + "vm1"]
    ran = []
    with pytest.raises(owner.NotOwner, match="owned by node a"), \
            owner.guarded(s, "b", "vm1", "bstart", facts()):
        ran.append(1)
    assert not ran and s.kvs[VM + "vm1"] == before


def test_a_change_of_the_record_between_read_and_write_is_refused() -> None:
    s = FakeStore()
    owner.claim_or_check(s, "a", "vm1", "bcreate")
    real_txn = s.txn

    def racing_txn(compares: Any, ops: Any) -> bool:
        s.txn = real_txn  # type: ignore[method-assign]
        owner.switch(s, "a", "vm1", "b")  # the record changes under the first command
        return real_txn(compares, ops)

    s.txn = racing_txn  # type: ignore[method-assign]
    with pytest.raises(BusyError, match="changed"):
        owner.claim_or_check(s, "a", "vm1", "bstart")
    assert s.kvs[VM + "vm1"].json()["node"] == "b"


def test_only_one_of_two_nodes_claims_a_name() -> None:
    s = FakeStore()
    results: list[str] = []
    barrier = threading.Barrier(2)

    def claim(me: str) -> None:
        barrier.wait()
        try:
            owner.claim_or_check(s, me, "vm1", "bcreate")
            results.append(me)
        except (owner.NotOwner, BusyError):
            pass

    threads = [threading.Thread(target=claim, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) >= 1
    assert s.kvs[VM + "vm1"].json()["node"] in results
    assert len({s.kvs[VM + "vm1"].json()["node"]}) == 1


def test_bremove_drops_the_record_and_a_failed_bcreate_gives_the_name_back() -> None:
    s = FakeStore()
    with owner.guarded(s, "a", "vm1", "bcreate", facts()):
        pass
    with owner.guarded(s, "a", "vm1", "bremove", facts(exists=False)):
        pass
    assert VM + "vm1" not in s.kvs
    with pytest.raises(RuntimeError), owner.guarded(s, "a", "vm2", "bcreate",
                                                    facts(exists=False)):
        raise RuntimeError("qemu-img failed")
    assert VM + "vm2" not in s.kvs


def test_switch_is_a_compare_and_swap_of_the_owner() -> None:
    s = FakeStore()
    owner.claim_or_check(s, "a", "vm1", "bcreate")
    owner.switch(s, "a", "vm1", "b")
    assert s.kvs[VM + "vm1"].json()["node"] == "b"
    with pytest.raises(owner.NotOwner):
        owner.switch(s, "a", "vm1", "c")  # a no longer owns it: no second switch from a
    # the source's own command ends after the switchover: it leaves the new owner's record
    owner.settle(s, "a", "vm1", "bmove", exists=False, facts={})
    assert s.kvs[VM + "vm1"].json()["node"] == "b"


def test_nothing_is_done_when_etcd_cannot_be_reached() -> None:
    s = FakeStore()
    s.down = True
    ran = []
    with pytest.raises(ClusterUnreachable), \
            owner.guarded(s, "a", "vm1", "bstart", facts()):
        ran.append(1)
    assert not ran


def test_a_handover_comes_back_until_the_target_registered_the_vm() -> None:
    s = FakeStore()
    owner.claim_or_check(s, "a", "vm1", "bcreate")
    owner.switch(s, "a", "vm1", "b")
    owner.take_back(s, "a", "vm1")  # b never registered it: the record is a's again
    assert s.kvs[VM + "vm1"].json()["node"] == "a" and "from" not in s.kvs[VM + "vm1"].json()
    owner.switch(s, "a", "vm1", "b")
    with owner.guarded(s, "b", "vm1", "bcreate", facts()):  # b's commit registers it
        assert s.kvs[VM + "vm1"].json()["from"] == "a"  # not taken up before it is there
    assert "from" not in s.kvs[VM + "vm1"].json()
    owner.take_back(s, "a", "vm1")
    with pytest.raises(owner.NotOwner):
        owner.claim_or_check(s, "a", "vm1", "bstart")
    assert s.kvs[VM + "vm1"].json()["node"] == "b"


def test_an_incoming_half_that_died_before_registering_leaves_the_record_to_take_back() -> None:
    s = FakeStore()
    owner.claim_or_check(s, "a", "vm1", "bcreate")
    owner.switch(s, "a", "vm1", "b")
    owner.claim_or_check(s, "b", "vm1", "bmigrate")  # b's half entered its guard, then died
    owner.take_back(s, "a", "vm1")
    assert s.kvs[VM + "vm1"].json()["node"] == "a"
    # an incoming half that failed cleanly drops the record; the source claims it again
    owner.switch(s, "a", "vm1", "b")
    with pytest.raises(RuntimeError), owner.guarded(s, "b", "vm1", "bmigrate",
                                                    facts(exists=False)):
        raise RuntimeError("migration failed")
    assert VM + "vm1" not in s.kvs
    owner.take_back(s, "a", "vm1")
    assert s.kvs[VM + "vm1"].json()["node"] == "a"


def test_a_move_cut_short_after_the_switch_is_settled_by_the_sources_next_command() -> None:
    s = FakeStore()
    owner.claim_or_check(s, "a", "vm1", "bcreate")
    owner.switch(s, "a", "vm1", "b")  # bmove killed here: its intent file stays at a
    intent = [True]
    # without the intent, a may not act on a record it handed over
    with pytest.raises(owner.NotOwner):
        owner.claim_or_check(s, "a", "vm1", "bstart")
    # with it, the command runs (its recovery asks b) and, the move settled with the VM
    # still at a, the record comes back
    with owner.guarded(s, "a", "vm1", "bstart", facts(), lambda: intent[0]):
        intent[0] = False  # recovery: b dropped what it staged
    assert s.kvs[VM + "vm1"].json()["node"] == "a"
    # had b committed, recovery removes a's copy, and the record stays b's
    owner.switch(s, "a", "vm1", "b")
    intent[0] = True
    with owner.guarded(s, "b", "vm1", "bcreate", facts()):
        pass
    with owner.guarded(s, "a", "vm1", "bstart", facts(exists=False), lambda: intent[0]):
        intent[0] = False
    assert s.kvs[VM + "vm1"].json()["node"] == "b"


def test_a_vm_lock_runs_inside_the_guard_and_a_refusal_releases_the_lock(tmp_path: Path) -> None:
    s = FakeStore()
    owner.claim_or_check(s, "a", "vm1", "bcreate")
    ctx = Context(Workdir(tmp_path))
    ctx.guard = lambda jname, what: owner.guarded(s, "b", jname, what, facts())
    with pytest.raises(owner.NotOwner):
        ctx.lock("vm1", "bstart")
    assert not is_held(ctx.workdir.lock_file("vm1"))
    ctx.lock("net-x", "network set-up", vm=False).release()  # host-wide locks: no guard
    ctx.guard = lambda jname, what: owner.guarded(s, "a", jname, what, facts())
    with ctx.lock("vm1", "bstart"):
        assert s.kvs[VM + "vm1"].json()["last"] == "bstart"
    assert s.kvs[VM + "vm1"].json()["status"] == "Off"
