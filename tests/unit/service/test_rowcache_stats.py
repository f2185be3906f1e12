"""GET /metrics through the list's row cache (RowCache.stats, service/rowcache.py): the facts
of a VM with no QEMU are kept between scrapes and read again exactly when something they are
derived from changed, so each scrape says what `cbsd bmetrics` (vmstats.gather, which keeps
nothing) says at that moment. Real files, inventory and inotify, as test_rowcache.py."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cbsd.cli.serve import api_keys
from cbsd.core.manage import vmstats
from cbsd.core.manage.vmstats import VMStats
from cbsd.core.vm.context import Context
from cbsd.core.vm.lock import VMLock
from cbsd.service import auth
from cbsd.service.app import Config, create_app
from cbsd.service.rowcache import RowCache
from cbsd.storage.ckpstore import MANIFEST
from cbsd.storage.inventory import Inventory
from cbsd.storage.paths import Workdir
from tests.unit.service.test_rowcache import NAMES, cache, wd

__all__ = ["cache", "wd"]  # fixtures, used by name


def scrape(cache: RowCache) -> dict[str, VMStats]:
    """{jname: facts} of one scrape through the cache, and that they equal gather's (what
    `cbsd bmetrics` reads, keeping nothing) at the same moment."""
    ctx = Context(cache.workdir, writable=False)
    try:
        stats, damaged = cache.stats(ctx)
        fresh, fresh_damaged = vmstats.gather(ctx)
    finally:
        ctx.inventory.close()
    moving = {"cpu_seconds": 0.0, "rss": 0}  # a live process's CPU time and memory move
    assert [dataclasses.replace(s, **moving) for s in stats] == [
        dataclasses.replace(s, **moving) for s in fresh]
    assert damaged == fresh_damaged
    return {s.jname: s for s in stats}


def asked(cache: RowCache, change: object = None) -> int:
    """How many VMs the scrape after *change* (a callable) read again."""
    if callable(change):
        change()
    before = cache.derived
    scrape(cache)
    return cache.derived - before


def checkpoint(wd: Workdir, jname: str, name: str, size: int) -> Path:
    """A published checkpoint folder (renamed into place, as a save publishes one) whose
    manifest is unreadable: listed, counted and sized, with no timings."""
    folder = wd.checkpoints(jname)
    folder.mkdir(exist_ok=True)
    tmp = folder / f".tmp-{name}"
    tmp.mkdir()
    (tmp / MANIFEST).write_text("{}")
    (tmp / "memory").write_bytes(b"m" * size)
    final = folder / f"{name}.ckp"
    tmp.rename(final)
    return final


def test_an_unchanged_vm_is_not_read_again(cache: RowCache) -> None:
    assert {j: s.status.value for j, s in scrape(cache).items()} == dict.fromkeys(NAMES, "Off")
    assert asked(cache) == 0


def test_the_list_and_the_metrics_keep_their_own_facts(cache: RowCache, wd: Workdir) -> None:
    """A look of the list keeps rows, a scrape keeps facts: neither drops the other's."""
    scrape(cache)
    ctx = Context(wd, writable=False)
    cache.rows(ctx)  # derives the rows (the facts were kept, not the rows)
    before = cache.derived
    cache.rows(ctx)
    ctx.inventory.close()
    assert cache.derived == before
    assert asked(cache) == 0


def test_each_status_change_is_in_the_next_scrape(cache: RowCache, wd: Workdir) -> None:
    scrape(cache)
    with VMLock(wd.lock_file("b"), "b", "bcheckpoint").acquire():
        assert scrape(cache)["b"].status.value == "Maintenance"  # no wait: a queued event
    assert scrape(cache)["b"].status.value == "Off"
    image = wd.hibernation("a")
    tmp = image.with_name(".tmp")
    tmp.mkdir()
    (tmp / MANIFEST).write_text("{}")
    tmp.rename(image)
    assert scrape(cache)["a"].status.value == "Suspended"
    (image / MANIFEST).unlink()
    image.rmdir()
    assert scrape(cache)["a"].status.value == "Off"


def test_checkpoints_their_size_and_newest_follow(cache: RowCache, wd: Workdir) -> None:
    scrape(cache)
    first = checkpoint(wd, "c", "one", 100)
    c = scrape(cache)["c"].checkpoints
    assert (c.count, c.newest) == (1, "one") and c.size > 100
    # A state's own files change only under the VM's lock (a fold into the chunk store):
    # its release is what the next scrape sees.
    with VMLock(wd.lock_file("c"), "c", "fold").acquire(), (first / "memory").open("ab") as f:
        f.write(b"m" * 1000)
    assert scrape(cache)["c"].checkpoints.size == c.size + 1000
    checkpoint(wd, "c", "two", 10)  # the folder is watched now: a rename in it is an event
    assert scrape(cache)["c"].checkpoints.count == 2
    assert asked(cache) == 0


def test_the_definition_and_a_process_are_read_at_every_scrape(
        cache: RowCache, wd: Workdir) -> None:
    scrape(cache)
    inv = Inventory(wd.inventory)
    spec = inv.get("a")
    assert spec is not None
    inv.update_spec(dataclasses.replace(spec, ram=64 << 20, cpus=2))
    inv.close()
    a = scrape(cache)["a"]
    assert (a.ram, a.cpus) == (64 << 20, 2)
    # A stand-in QEMU (its argv names the VM's QMP socket): never kept, it may die at once.
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                             str(wd.qmp_sock("b"))])
    try:
        inv = Inventory(wd.inventory)
        inv.set_runtime("b", qemu.pid)
        inv.close()
        assert scrape(cache)["b"].status.value == "On"
        assert asked(cache) == 1
        qemu.kill()
        qemu.wait()
        assert scrape(cache)["b"].status.value == "Off"
    finally:
        qemu.kill()
        qemu.wait()


def test_the_service_scrapes_through_its_row_cache(wd: Workdir) -> None:
    """GET /metrics reads a VM with no QEMU once, then only when it changed."""
    token = auth.add_token(wd, "ci")
    app = create_app(Config(wd, api_keys))
    with TestClient(app, base_url="http://cbsd",
                    headers={"Authorization": f"Bearer {token}"}) as client:
        rows: RowCache = app.state.rows

        def statuses() -> dict[str, str]:
            r = client.get("/metrics")
            assert r.status_code == 200
            return {s.labels["jname"]: s.labels["status"]
                    for f in text_string_to_metric_families(r.text) if f.name == "cbsd_vm_status"
                    for s in f.samples if s.value == 1}

        before = rows.derived
        assert statuses() == dict.fromkeys(NAMES, "Off")
        assert rows.derived == before + len(NAMES), "the scrape read the VMs through the cache"
        assert statuses() == dict.fromkeys(NAMES, "Off")
        assert rows.derived == before + len(NAMES), "an unchanged VM was read again"
        with VMLock(wd.lock_file("a"), "a", "bstart").acquire():
            assert statuses()["a"] == "Maintenance"
        assert statuses() == dict.fromkeys(NAMES, "Off")
