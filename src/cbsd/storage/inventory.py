"""The VM inventory: one SQLite file (WAL, busy timeout), schema versioned by user_version.

Only definitions and a little runtime bookkeeping live here (the QEMU pid and VNC port of the
last start); a VM's status is always derived from the live system, never read from this file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cbsd.core.model import VMSpec
from cbsd.errors import CbsdError, StateError

SCHEMA_VERSION = 1

# Each entry upgrades the schema from version i to i+1; never edit a released entry.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE vm (
        jname    TEXT PRIMARY KEY,
        spec     TEXT NOT NULL,
        created  REAL NOT NULL,
        pid      INTEGER NOT NULL DEFAULT 0,
        vnc_port INTEGER NOT NULL DEFAULT 0
    );
    """,
]


class Inventory:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as e:
            raise CbsdError(f"cannot open inventory {path}: {e}") from e
        self._db.execute("PRAGMA busy_timeout = 30000")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise CbsdError(
                f"inventory {self.path} has schema {version}, newer than this cbsd knows "
                f"({SCHEMA_VERSION}): upgrade cbsd"
            )
        self._db.execute("PRAGMA journal_mode = WAL")
        with self._tx():
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version, SCHEMA_VERSION):
                for stmt in filter(str.strip, _MIGRATIONS[step].split(";")):
                    self._db.execute(stmt)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add(self, spec: VMSpec) -> None:
        try:
            with self._tx():
                self._db.execute(
                    "INSERT INTO vm (jname, spec, created) VALUES (?, ?, ?)",
                    (spec.jname, json.dumps(spec.to_dict()), time.time()),
                )
        except sqlite3.IntegrityError:
            raise StateError(f"VM already exist: {spec.jname}") from None

    def update_spec(self, spec: VMSpec) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE vm SET spec = ? WHERE jname = ?", (json.dumps(spec.to_dict()), spec.jname)
            )

    def remove(self, jname: str) -> None:
        with self._tx():
            self._db.execute("DELETE FROM vm WHERE jname = ?", (jname,))

    def names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT jname FROM vm ORDER BY jname")]

    def get(self, jname: str) -> VMSpec | None:
        row = self._db.execute("SELECT spec FROM vm WHERE jname = ?", (jname,)).fetchone()
        return VMSpec.from_dict(json.loads(row[0])) if row else None

    def all(self) -> list[tuple[VMSpec, int, int]]:
        rows = self._db.execute("SELECT spec, pid, vnc_port FROM vm ORDER BY jname")
        return [(VMSpec.from_dict(json.loads(s)), pid, port) for s, pid, port in rows]

    def runtime(self, jname: str) -> tuple[int, int]:
        row = self._db.execute("SELECT pid, vnc_port FROM vm WHERE jname = ?", (jname,)).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def set_runtime(self, jname: str, pid: int, vnc_port: int = 0) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE vm SET pid = ?, vnc_port = ? WHERE jname = ?", (pid, vnc_port, jname)
            )
