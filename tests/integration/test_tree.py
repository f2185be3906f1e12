"""The checkpoint tree and retention (keep=N), judged by restoring and watching the guest."""

from __future__ import annotations

import pytest

from tests.harness import Cbsd
from tests.vmchecks import checkpoint, disk_tags, restore

pytestmark = pytest.mark.vm


def parents(cbsd: Cbsd, jname: str = "vm1") -> dict[str, object]:
    return {str(d["name"]): d["parent"] for d in cbsd.checkpoints(jname)}


def listing(cbsd: Cbsd) -> str:
    return cbsd("bcheckpoint", "mode=list", "jname=vm1").ok().out


def test_parents_follow_restores_and_destroy_moves_children_up(cbsd: Cbsd,
                                                               running_counter: str) -> None:
    checkpoint(cbsd, "vm1", "base")
    checkpoint(cbsd, "vm1", "a")  # taken after base
    cbsd("bstop", "vm1", "noacpi=1").ok()
    restore(cbsd, "vm1", "base")
    _, b_hi = checkpoint(cbsd, "vm1", "b")  # taken after restoring base: a sibling of a
    _, c_hi = checkpoint(cbsd, "vm1", "c")
    assert parents(cbsd) == {"base": None, "a": "base", "b": "base", "c": "b"}
    assert listing(cbsd) == ("Created checkpoint for vm1:\n  base\n  ├─ a\n  └─ b\n"
                             "     └─ c *\n")
    cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=b").ok()
    assert parents(cbsd) == {"base": None, "a": "base", "c": "base"}
    assert listing(cbsd) == "Created checkpoint for vm1:\n  base\n  ├─ a\n  └─ c *\n"
    # Every other checkpoint stays restorable: the guest continues from each one's instant.
    cbsd("bstop", "vm1", "noacpi=1").ok()
    first = restore(cbsd, "vm1", "c")[0][0]
    assert first > b_hi - 3 and first <= c_hi + 1
    cbsd("bstop", "vm1", "noacpi=1").ok()
    restore(cbsd, "vm1", "a")
    checkpoint(cbsd, "vm1", "a2")
    assert parents(cbsd)["a2"] == "a"
    assert all(d["restorable"] for d in cbsd.checkpoints("vm1"))


def test_hibernation_carries_the_parent_and_a_cold_boot_has_none(cbsd: Cbsd,
                                                                 running_counter: str) -> None:
    checkpoint(cbsd, "vm1", "x")
    cbsd("bsuspend", "vm1").ok()
    cbsd("bstart", "vm1").ok()  # resumed: still descends from x
    checkpoint(cbsd, "vm1", "y")
    assert parents(cbsd)["y"] == "x"
    checkpoint(cbsd, "vm1", "y")  # taken again under the name the VM descends from
    assert parents(cbsd)["y"] == "x", "a replaced checkpoint keeps the replaced one's parent"
    cbsd("bstop", "vm1", "noacpi=1").ok()
    cbsd("bstart", "vm1").ok()  # a cold boot descends from nothing
    checkpoint(cbsd, "vm1", "z")
    assert parents(cbsd)["z"] is None
    assert "*" in listing(cbsd).splitlines()[-1]


def test_keep_removes_the_oldest_only_after_the_new_one_is_safe(cbsd: Cbsd,
                                                                running_counter: str) -> None:
    for name in ("k1", "k2", "k3"):
        checkpoint(cbsd, "vm1", name)
    r = cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=k4", "keep=2").ok()
    assert r.out.splitlines()[1] == "vm1: keep=2: removed the oldest checkpoint(s): k1, k2"
    assert list(parents(cbsd)) == ["k3", "k4"]
    assert len(disk_tags(cbsd, "vm1")) == 2, "the removed ones' disk snapshots are released"
    assert parents(cbsd) == {"k3": None, "k4": "k3"}  # k3's parent k2 is gone: moved up
    # A create killed before its checkpoint is safe removes nothing.
    cbsd.at_failpoint("save:verified", "bcheckpoint", "mode=create", "jname=vm1", "name=k5",
                      "keep=1").kill9()
    assert list(parents(cbsd)) == ["k3", "k4"]
    cbsd("bstop", "vm1", "noacpi=1").ok()  # the next command clears what the kill left
    assert len(disk_tags(cbsd, "vm1")) == 2, "the killed create's snapshot is swept"
    restore(cbsd, "vm1", "k3")
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=k1", "keep=0").fails(
        2, "bad value for keep")
    assert list(parents(cbsd)) == ["k3", "k4"]
