from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from cbsd.errors import CbsdError, StateError
from cbsd.model import VMSpec
from cbsd.storage.inventory import SCHEMA_VERSION, Inventory


def spec(name: str) -> VMSpec:
    return VMSpec(jname=name, ram=64 << 20, disks=["dsk1.qcow2"])


def test_add_get_remove(tmp_path: Path) -> None:
    inv = Inventory(tmp_path / "db.sqlite")
    inv.add(spec("a"))
    assert inv.get("a") == spec("a")
    assert inv.names() == ["a"]
    inv.set_runtime("a", 123, 5901)
    assert inv.runtime("a") == (123, 5901)
    inv.remove("a")
    assert inv.get("a") is None


def test_duplicate_is_refused_with_cbsds_message(tmp_path: Path) -> None:
    inv = Inventory(tmp_path / "db.sqlite")
    inv.add(spec("a"))
    with pytest.raises(StateError, match="VM already exist: a"):
        inv.add(spec("a"))


def test_schema_version_and_wal(tmp_path: Path) -> None:
    Inventory(tmp_path / "db.sqlite").close()
    con = sqlite3.connect(tmp_path / "db.sqlite")
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Inventory(tmp_path / "db.sqlite").close()
    con = sqlite3.connect(tmp_path / "db.sqlite")
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(CbsdError, match="newer than this cbsd knows"):
        Inventory(tmp_path / "db.sqlite")


def _writer(path: str, prefix: str) -> None:
    inv = Inventory(Path(path))
    for i in range(40):
        inv.add(spec(f"{prefix}{i}"))
        inv.set_runtime(f"{prefix}{i}", i, 0)


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite")
    procs = [multiprocessing.Process(target=_writer, args=(path, p)) for p in "abcd"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(Inventory(Path(path)).names()) == 160
