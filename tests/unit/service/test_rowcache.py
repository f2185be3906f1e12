"""The service's list cache (service/rowcache.py) and the status watcher built on it: a
VM's row is derived again exactly when something it is derived from changed, and a row with a
process is derived at every look -- so the list is never older than the request. Real files,
a real inventory and real inotify; a `sleep` whose command line carries the VM's QMP socket
path stands in for its QEMU."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cbsd.core.manage import listing
from cbsd.core.vm.context import Context
from cbsd.core.vm.lock import VMLock
from cbsd.model import VMSpec
from cbsd.service.events import Bus, StatusWatcher
from cbsd.service.rowcache import RowCache
from cbsd.storage.ckpstore import MANIFEST
from cbsd.storage.inventory import Inventory
from cbsd.storage.paths import Workdir

NAMES = ("a", "b", "c")


@pytest.fixture
def wd(tmp_path: Path) -> Iterator[Workdir]:
    wd = Workdir(tmp_path / "wd")
    wd.ensure()
    inv = Inventory(wd.inventory)
    for name in NAMES:
        inv.add(VMSpec(jname=name, ram=32 << 20))
        wd.system(name).mkdir()
    inv.close()
    yield wd


@pytest.fixture
def cache(wd: Workdir) -> Iterator[RowCache]:
    c = RowCache(wd)
    yield c
    c.close()


def look(cache: RowCache) -> dict[str, dict[str, Any]]:
    """{jname: row} of one look, and that it equals bls's rows (the same facts)."""
    ctx = Context(cache.workdir, writable=False)
    try:
        rows, _, damaged = cache.rows(ctx)
        plain, _, _ = listing.rows(ctx, None)
    finally:
        ctx.inventory.close()
    assert not damaged
    moving = ("checkpoints", "vm_curmem", "pcpu")  # a live process's memory and CPU move
    assert [{k: v for k, v in r.items() if k not in moving} for r in rows] == [
        {k: v for k, v in r.items() if k not in moving} for r in plain]
    return {r["jname"]: r for r in rows}


def derived(cache: RowCache, change: Any = None) -> int:
    """How many rows the look after *change* derived again."""
    if change is not None:
        change()
    before = cache.derived
    look(cache)
    return cache.derived - before


def test_an_unchanged_vm_is_not_derived_again(cache: RowCache) -> None:
    assert {j: r["status"] for j, r in look(cache).items()} == dict.fromkeys(NAMES, "Off")
    assert derived(cache) == 0
    rows = look(cache)
    rows["a"]["status"] = "scribbled"  # a caller's copy: the cache's row is untouched
    assert look(cache)["a"]["status"] == "Off"


def test_a_lock_taken_shows_maintenance_at_once(cache: RowCache, wd: Workdir) -> None:
    look(cache)
    with VMLock(wd.lock_file("b"), "b", "bstart").acquire():
        rows = look(cache)  # no wait: the holder's line is an event queued before the look
        assert rows["b"]["status"] == "Maintenance"
        assert (rows["a"]["status"], rows["c"]["status"]) == ("Off", "Off")
    assert look(cache)["b"]["status"] == "Off"  # released: emptying the line is an event


def test_only_the_vm_whose_files_changed_is_derived(cache: RowCache, wd: Workdir) -> None:
    look(cache)
    assert derived(cache, lambda: (wd.system("a") / "unrelated").touch()) == 1
    assert derived(cache, lambda: VMLock(wd.lock_file("c"), "c", "x").acquire().release()) == 1
    assert derived(cache) == 0


def test_a_hibernation_image_shows_suspended(cache: RowCache, wd: Workdir) -> None:
    look(cache)
    image = wd.hibernation("a")
    tmp = image.with_name(".tmp")
    tmp.mkdir()
    (tmp / MANIFEST).write_text("{}")
    tmp.rename(image)  # published as a state is: renamed into place
    assert look(cache)["a"]["status"] == "Suspended"
    (image / MANIFEST).unlink()
    image.rmdir()
    assert look(cache)["a"]["status"] == "Off"


def test_checkpoints_are_counted_as_they_come(cache: RowCache, wd: Workdir) -> None:
    assert look(cache)["b"]["checkpoints"] == 0
    wd.checkpoints("b").mkdir()
    (wd.checkpoints("b") / "one.ckp").mkdir()  # the folder is new: its creation is an event
    assert look(cache)["b"]["checkpoints"] == 1
    (wd.checkpoints("b") / "two.ckp").mkdir()  # ... and the folder is watched from then on
    assert look(cache)["b"]["checkpoints"] == 2


def test_the_inventory_is_read_at_every_look(cache: RowCache, wd: Workdir) -> None:
    look(cache)
    inv = Inventory(wd.inventory)
    spec = inv.get("a")
    assert spec is not None
    inv.update_spec(dataclasses.replace(spec, ram=64 << 20, cpus=2))
    inv.add(VMSpec(jname="d", ram=32 << 20))  # no folder yet: its creation is an event
    inv.remove("c")
    inv.close()
    rows = look(cache)
    assert sorted(rows) == ["a", "b", "d"]
    assert (rows["a"]["vm_ram"], rows["a"]["vm_cpus"]) == (64, 2)
    assert derived(cache) == 0
    assert derived(cache, lambda: wd.system("d").mkdir()) == 1


def test_a_damaged_entry_is_named_not_listed(cache: RowCache, wd: Workdir) -> None:
    look(cache)
    inv = Inventory(wd.inventory)
    inv._write("UPDATE vm SET spec = ? WHERE jname = 'b'", json.dumps({"jname": "b"}))
    inv.close()
    ctx = Context(wd, writable=False)
    rows, _, damaged = cache.rows(ctx)
    ctx.inventory.close()
    assert [r["jname"] for r in rows] == ["a", "c"]
    assert len(damaged) == 1 and "the entry of b is damaged" in damaged[0]


def test_a_vm_with_a_process_is_derived_at_every_look(cache: RowCache, wd: Workdir) -> None:
    """A QEMU may die (kill -9) or pause touching no file: its row is never kept."""
    marker = str(wd.qmp_sock("a"))
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
    try:
        inv = Inventory(wd.inventory)
        inv.set_runtime("a", qemu.pid)
        inv.close()
        # its monitor does not answer (there is none): alive, so On, noted as unresponsive
        assert look(cache)["a"]["status"] == "On"
        assert derived(cache) == 1
        qemu.kill()
        qemu.wait()
        assert look(cache)["a"]["status"] == "Off"  # at once, no file changed
    finally:
        qemu.kill()
        qemu.wait()


def test_an_unknown_file_among_the_locks_derives_all(cache: RowCache, wd: Workdir) -> None:
    look(cache)
    assert derived(cache, lambda: (wd.locks / "something-else").touch()) == len(NAMES)


def test_the_status_watcher_derives_only_what_changed(cache: RowCache, wd: Workdir) -> None:
    """The event stream's watcher shares the cache: its look after a change derives the VM
    that changed, and publishes that VM's new status only."""
    published: list[dict[str, Any]] = []

    class Recorder(Bus):
        def publish(self, kind: str, metadata: dict[str, Any]) -> None:
            published.append(metadata)

    watcher = StatusWatcher(wd, Recorder(), cache)  # its first look: every VM, no event
    assert published == [{"name": n, "status": "Off", "previous": None} for n in NAMES]
    published.clear()
    before = cache.derived
    with VMLock(wd.lock_file("b"), "b", "bstart").acquire():
        watcher.look()
    watcher.look()
    assert cache.derived - before == 2  # b, twice; a and c not at all
    assert published == [{"name": "b", "status": "Maintenance", "previous": "Off"},
                         {"name": "b", "status": "Off", "previous": "Maintenance"}]
