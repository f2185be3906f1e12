"""The VM inventory: one SQLite file (WAL, busy timeout), schema versioned by user_version.

Only definitions and a little runtime bookkeeping live here (the QEMU pid and VNC port of the
last start, a hint: core/vm/machine.py); a VM's status is always derived from the live system, never
read from this file. Each VM's definition is also kept beside its files (vm.json), so a lost
or damaged inventory can be rebuilt: `cbsd bregister jname='*'` (docs/reliability.md).

Every SQLite error becomes an EnvironmentFault naming the file and what to do. A read-only
inventory (readonly=True) never writes: it reads a missing file as empty, and a file on a
read-only filesystem through SQLite's read-only and immutable modes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cbsd.errors import EnvironmentFault, StateError, UsageError
from cbsd.model import VMSpec
from cbsd.storage.paths import free_bytes

SCHEMA_VERSION = 2

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
    # 2: the other hosts cbsd reaches over SSH (cbsd node).
    """
    CREATE TABLE node (
        name  TEXT PRIMARY KEY,
        host  TEXT NOT NULL,
        port  INTEGER NOT NULL DEFAULT 22
    );
    """,
]


class Inventory:
    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._cannot_write = f"inventory {path} is open read-only"
        self._db: sqlite3.Connection | None = None
        with self._errors():
            if readonly:
                self._db = _open_readonly(path)
                if self._db is not None and self._version() != SCHEMA_VERSION:
                    if self._version() == 0:
                        self._db = None  # created but never set up: no VMs
                    else:
                        self._check_version(self._version())
            else:
                try:
                    self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
                    self._db.execute("PRAGMA busy_timeout = 30000")
                    self._migrate()
                except sqlite3.OperationalError as e:
                    # A full disk: SQLite cannot even write its WAL index. Reads still work
                    # through the read-only modes, and every write says why it cannot.
                    self._db = _open_readonly(path) if path.exists() else None
                    if self._db is None:
                        raise
                    self.readonly = True
                    self._cannot_write = _explain(path, e)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as e:
            raise EnvironmentFault(_explain(self.path, e)) from e

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def _version(self) -> int:
        assert self._db is not None
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise EnvironmentFault(
                f"inventory {self.path} has schema {version}, newer than this cbsd knows "
                f"({SCHEMA_VERSION}): upgrade cbsd")

    def _migrate(self) -> None:
        assert self._db is not None
        version = self._version()
        if version == SCHEMA_VERSION:
            return
        self._check_version(version)
        self._db.execute("PRAGMA journal_mode = WAL")
        with self._tx():
            # Re-read under the write lock: another process may have migrated meanwhile.
            for step in range(self._version(), SCHEMA_VERSION):
                for stmt in filter(str.strip, _MIGRATIONS[step].split(";")):
                    self._db.execute(stmt)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self._db is None or self.readonly:
            raise EnvironmentFault(self._cannot_write)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _rows(self, sql: str, *params: Any) -> list[Any]:
        if self._db is None:
            return []
        with self._errors():
            return list(self._db.execute(sql, params))

    def _write(self, sql: str, *params: Any) -> None:
        with self._errors(), self._tx() as db:
            db.execute(sql, params)

    def add(self, spec: VMSpec) -> None:
        try:
            self._write("INSERT INTO vm (jname, spec, created) VALUES (?, ?, ?)",
                        spec.jname, json.dumps(spec.to_dict()), time.time())
        except sqlite3.IntegrityError:
            raise StateError(f"VM already exist: {spec.jname}") from None

    def update_spec(self, spec: VMSpec) -> None:
        self._write("UPDATE vm SET spec = ? WHERE jname = ?", json.dumps(spec.to_dict()),
                    spec.jname)

    def rename(self, old: str, spec: VMSpec) -> None:
        """Move *old*'s entry to spec.jname, runtime fields and all, in one transaction."""
        try:
            with self._errors(), self._tx() as db:
                db.execute("UPDATE vm SET jname = ?, spec = ? WHERE jname = ?",
                           (spec.jname, json.dumps(spec.to_dict()), old))
        except sqlite3.IntegrityError:
            raise StateError(f"VM already exist: {spec.jname}") from None

    def remove(self, jname: str) -> None:
        self._write("DELETE FROM vm WHERE jname = ?", jname)

    def names(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT jname FROM vm ORDER BY jname")]

    def get(self, jname: str) -> VMSpec | None:
        rows = self._rows("SELECT spec FROM vm WHERE jname = ?", jname)
        return self._spec(jname, rows[0][0]) if rows else None

    def all(self) -> list[tuple[str, VMSpec | EnvironmentFault, int, int]]:
        """Every entry: (jname, its spec -- or, for an entry that is damaged, the error that
        says so --, pid, VNC port). One damaged entry never hides the others (bls)."""
        return [(jname, self.parse(jname, text), pid, port)
                for jname, text, pid, port in self.entries()]

    def entries(self) -> list[tuple[str, str, int, int]]:
        """Every entry as stored: (jname, its definition's text, pid, VNC port). The service
        parses only the texts that changed since its last look (service/rowcache.py)."""
        return [(str(j), str(t), int(p or 0), int(v or 0)) for j, t, p, v in self._rows(
            "SELECT jname, spec, pid, vnc_port FROM vm ORDER BY jname")]

    def parse(self, jname: str, text: str) -> VMSpec | EnvironmentFault:
        """The definition *text* of entry *jname*, or the EnvironmentFault that says it is
        damaged (see _spec)."""
        try:
            return self._spec(jname, text)
        except EnvironmentFault as e:
            return e

    def _spec(self, jname: str, text: str) -> VMSpec:
        """The entry's definition, checked as any definition cbsd did not just make itself
        (cbsd/specs.py): a damaged one is an EnvironmentFault naming the VM and the key."""
        # lazy: only a stored row needs it (~0.5 ms): bls of an empty workdir skips it
        from cbsd.specs import from_untrusted

        where = f"inventory {self.path}: the entry of {jname} is damaged"
        repair = f"'cbsd bregister jname={jname}' restores it from the VM's vm.json"
        try:
            spec = from_untrusted(json.loads(text), where)
        except ValueError as e:
            raise EnvironmentFault(f"{where} ({e}); {repair}") from e
        except UsageError as e:
            raise EnvironmentFault(f"{e}; {repair}") from e
        if spec.jname != jname:
            raise EnvironmentFault(f"{where}: it describes {spec.jname!r}; {repair}")
        return spec

    def add_node(self, name: str, host: str, port: int) -> None:
        try:
            self._write("INSERT INTO node (name, host, port) VALUES (?, ?, ?)", name, host, port)
        except sqlite3.IntegrityError:
            raise StateError(f"node already exists: {name} (node mode=remove first)") from None

    def remove_node(self, name: str) -> None:
        self._write("DELETE FROM node WHERE name = ?", name)

    def nodes(self) -> list[tuple[str, str, int]]:
        """(name, host, port) of every node; none in an inventory older than nodes."""
        if self._db is None or self._version() < 2:
            return []
        return [(str(n), str(h), int(p))
                for n, h, p in self._rows("SELECT name, host, port FROM node ORDER BY name")]

    def runtime(self, jname: str) -> tuple[int, int]:
        rows = self._rows("SELECT pid, vnc_port FROM vm WHERE jname = ?", jname)
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    def set_runtime(self, jname: str, pid: int, vnc_port: int = 0) -> None:
        """Raises sqlite3.OperationalError (or EnvironmentFault, read-only) as they are: the pid
        is only a hint, and the caller decides whether not recording it matters."""
        with self._tx() as db:
            db.execute("UPDATE vm SET pid = ?, vnc_port = ? WHERE jname = ?",
                       (pid, vnc_port, jname))


def _open_readonly(path: Path) -> sqlite3.Connection | None:
    """Read without writing: normally; on a read-only filesystem (SQLite cannot create the WAL
    index there) through mode=ro, then immutable=1, which is sound because nothing can write
    that file either."""
    if not path.exists():
        return None
    for query in ("", "?mode=ro", "?immutable=1"):
        try:
            db = (sqlite3.connect(path, timeout=30.0, isolation_level=None) if not query
                  else sqlite3.connect(f"file:{path}{query}", uri=True, isolation_level=None))
            db.execute("PRAGMA user_version").fetchone()
            return db
        except sqlite3.OperationalError:
            continue  # cannot open this way here: try the next
    return sqlite3.connect(f"file:{path}?immutable=1", uri=True, isolation_level=None)


def _full(path: Path) -> bool:
    try:
        return free_bytes(path.parent) == 0
    except OSError:
        return False


def _explain(path: Path, e: sqlite3.Error) -> str:
    text = str(e)
    if "not a database" in text or "malformed" in text:
        return (f"inventory {path} is damaged ({text}): move it aside, then "
                "'cbsd bregister jname=*' rebuilds it from the VMs' files")
    if "disk is full" in text or _full(path):
        return f"inventory {path}: no space left on device"
    if "readonly" in text or "read-only" in text:
        return f"inventory {path} cannot be written ({text})"
    return f"inventory {path}: {text}"
