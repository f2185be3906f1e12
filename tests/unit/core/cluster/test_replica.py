"""Replication's rules without VMs (tests/integration/test_replicate.py runs them on three
hosts): the standby's recipe built from what it has and what was shipped, what recovery
removes, the ha_interval shape, mode=list's chain, and the periodic loop's schedule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import xxhash

from cbsd.core.checkpoint.checkpoints import _chain
from cbsd.core.cluster import hasched, replica
from cbsd.errors import ArchiveError, StateError, UsageError
from cbsd.names import parse_interval
from cbsd.storage.chunkstore import RECIPE, Recipe, Store
from cbsd.storage.paths import Workdir


def chunk(data: bytes) -> tuple[bytes, int]:
    return xxhash.xxh3_128_digest(data), len(data)


def entries(*chunks: bytes) -> bytes:
    return b"".join(replica.ENTRY.pack(*chunk(c)) for c in chunks)


def test_the_recipe_takes_known_chunks_where_they_are_and_new_ones_from_the_shipped_pack(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.packs.mkdir(parents=True)
    old_a, old_b, new_c = b"a" * 100, b"b" * 50, b"c" * 70
    (store.packs / "old.pack").write_bytes(old_a + old_b)
    base = Recipe(["old"], 150, [(chunk(old_a)[0], 0, 0, 100), (chunk(old_b)[0], 0, 100, 50)])
    rep = replica.Replica("vm", 1, "a", 1.0, {}, "x", tmp_path)
    (tmp_path / "gen-1.ckp").mkdir()
    (tmp_path / "gen-1.ckp" / RECIPE).write_bytes(base.to_bytes())
    (tmp_path / "entries").write_bytes(entries(old_b, new_c, old_a, new_c))
    tmp_pack = store.packs / ".tmp-new.pack"
    tmp_pack.write_bytes(new_c)  # each new chunk once, in order of first use
    recipe = replica._recipe(store, rep, tmp_path / "entries", tmp_pack, "new")
    assert recipe.packs == ["old", "new"] and recipe.size == 50 + 70 + 100 + 70
    assert [(p, o, n) for _, p, o, n in recipe.entries] == [
        (0, 100, 50), (1, 0, 70), (0, 0, 100), (1, 0, 70)]
    assert (store.packs / "new.pack").exists() and not tmp_pack.exists()
    rebuilt = tmp_path / "stream"
    store.rebuild(recipe, rebuilt)
    assert rebuilt.read_bytes() == old_b + new_c + old_a + new_c


def test_a_shipped_pack_that_does_not_fit_the_standby_s_base_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.packs.mkdir(parents=True)
    (tmp_path / "entries").write_bytes(entries(b"a" * 10))
    tmp_pack = store.packs / ".tmp-new.pack"
    tmp_pack.write_bytes(b"")  # the owner believed the standby had chunk a: it has nothing
    with pytest.raises(ArchiveError, match="not based on what this replica has"):
        replica._recipe(store, None, tmp_path / "entries", tmp_pack, "new")
    (tmp_path / "entries").write_bytes(b"x" * 7)
    with pytest.raises(ArchiveError, match="truncated"):
        replica._recipe(store, None, tmp_path / "entries", tmp_pack, "new")


def test_recovery_removes_what_the_publish_point_does_not_name(tmp_path: Path) -> None:
    wd = Workdir(tmp_path / "wd")
    root = replica.folder(wd, "vm")
    root.mkdir(parents=True)
    store = Store(root / "store")
    store.packs.mkdir(parents=True)
    (store.packs / "kept.pack").write_bytes(b"k" * 10)
    (store.packs / "orphan.pack").write_bytes(b"o" * 10)
    (store.packs / ".tmp-cut.pack").write_bytes(b"t")
    (root / "gen-1.ckp").mkdir()
    (root / "gen-1.ckp" / RECIPE).write_bytes(
        Recipe(["kept"], 10, [(chunk(b"k" * 10)[0], 0, 0, 10)]).to_bytes())
    (root / ".gen-2.ckp").mkdir()  # an apply cut short before it published
    (root / "gen-0.ckp").mkdir()  # a published one's predecessor, not yet removed
    assert replica.recover(wd, "vm") is None  # nothing published yet: everything goes
    assert sorted(p.name for p in root.iterdir()) == ["store"]
    (root / "gen-1.ckp").mkdir()
    (root / "gen-1.ckp" / RECIPE).write_bytes(
        Recipe(["kept"], 10, [(chunk(b"k" * 10)[0], 0, 0, 10)]).to_bytes())
    (store.packs / "kept.pack").write_bytes(b"k" * 10)
    (store.packs / "orphan.pack").write_bytes(b"o" * 10)
    (root / ".gen-2.ckp").mkdir()
    (root / replica.PUBLISHED).write_text(json.dumps(
        {"generation": 1, "source": "a", "taken": 1.0, "spec": {}, "stream": "x"}))
    rep = replica.recover(wd, "vm")
    assert rep is not None and rep.generation == 1 and rep.tag == "cbsd-rep-1"
    assert sorted(p.name for p in root.iterdir()) == ["gen-1.ckp", "replica.json", "store"]
    assert sorted(os.listdir(store.packs)) == ["kept.pack"]
    assert replica.status(wd, "vm")["generation"] == 1
    (root / replica.PUBLISHED).write_text("{")
    with pytest.raises(StateError, match="unreadable"):
        replica.latest(wd, "vm")


@pytest.mark.parametrize(("raw", "seconds"), [("30s", 30), ("5m", 300), ("1m30s", 90),
                                              ("45", 45), ("1h", 3600)])
def test_ha_interval(raw: str, seconds: int) -> None:
    assert parse_interval(raw, "ha_interval") == seconds


@pytest.mark.parametrize("raw", ["4s", "0", "", "5x", "-5s", "1.5m"])
def test_ha_interval_refused(raw: str) -> None:
    with pytest.raises(UsageError, match="ha_interval"):
        parse_interval(raw, "ha_interval")


def test_mode_list_shows_the_chain_on_the_replicated_checkpoint_only() -> None:
    rep = {"node": "b", "generation": 4, "chain": [[1, None], [2, 1], [4, 2]]}
    assert _chain(rep, "ha-4") == "on b as generation 4 (4 on 2, 2 on 1, 1 full)"
    assert _chain(rep, "ha-2") is None and _chain({}, "ha-1") is None


class Child:
    def __init__(self, code: int | None = None) -> None:
        self.returncode = code

    def poll(self) -> int | None:
        return self.returncode

    def communicate(self) -> tuple[bytes, bytes]:
        return b"vm: generation 1 replicated to b\n", b"vm: busy\n"


def test_the_loop_starts_one_replication_per_interval_and_never_two_at_once(
        tmp_path: Path) -> None:
    wd = Workdir(tmp_path)
    (tmp_path / "cluster").mkdir()
    now = [100.0]
    children: list[Child] = []

    def start(_: Workdir, jname: str) -> Child:
        children.append(Child())
        return children[-1]

    loop = hasched.Loop(wd, vms=lambda _: {"vm": 30, "fast": 5}, start=start,  # type: ignore[arg-type]
                        clock=lambda: now[0])
    assert loop.tick() == ["fast", "vm"]
    now[0] += 10
    assert loop.tick() == []  # both still running: none starts again
    children[0].returncode = 0  # fast's child ends
    assert loop.tick() == ["fast"]  # its interval has passed
    children[1].returncode = 0
    now[0] += 10
    assert loop.tick() == []  # vm: 20 s of 30 since it began
    now[0] += 10
    assert loop.tick() == ["vm"]
    children[-1].returncode = hasched.BUSY  # another command held vm: due at the next tick
    assert loop.tick() == ["vm"]
    log = hasched.log_path(wd).read_text().splitlines()
    assert log[0].endswith("fast exit 0: vm: generation 1 replicated to b")
    assert log[-1].endswith(f"vm exit {hasched.BUSY}: vm: busy")


def test_remove_drops_the_replica_and_says_when_there_is_none(tmp_path: Path) -> None:
    wd = Workdir(tmp_path / "wd")
    root = replica.folder(wd, "vm")
    (root / "gen-1.ckp").mkdir(parents=True)
    assert replica.remove(wd, "vm") == "vm: replica removed"
    assert not root.exists()
    with pytest.raises(StateError, match="no replica of it on this node"):
        replica.remove(wd, "vm")
