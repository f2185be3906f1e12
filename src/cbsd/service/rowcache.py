"""The service's list of VMs: bls's rows, each derived again only when it may have changed.

cbsd never stores a status: it derives it (docs/architecture.md). Deriving every VM's row at
each GET /1.0/instances costs 0.05-0.1 ms per VM on an idle host (its definition parsed and
checked, its lock, pidfile and hibernation image looked at), several times that under load.
This keeps the last row of each VM that has no QEMU (Off, Suspended) and derives it again
when one of these changed:

- its inventory entry (definition text, pid, VNC port: compared at every look, one query);
- a file its status is derived from, as inotify reports it: its lock file (a command writes
  its holder line on taking the lock and empties it on release: every status change happens
  under the lock), its folder under jails-system (QEMU's pidfile, the hibernation image),
  and its checkpoints folder (the list's checkpoint count).

The inotify queue is read at the start of every look, in the looking thread: a change made
before a request arrived is in the queue (the kernel queues it as the file changes), so it
is seen by that request -- never a row older than the request. A VM with a QEMU (On,
Paused, Maintenance) is derived in full at every look (its QEMU may die or pause without
touching a file: kill -9 shows Off at once), and so is a VM whose folder is not watched
(not made yet, or inotify refused the watch). A lost event (queue overflow) re-derives all.

GET /metrics shares it (stats()): what the metrics say of a VM with no QEMU -- its status,
its definition's CPUs and RAM, its checkpoints' count, size, newest and timings -- changes
only with the same inventory entry and files, under the same lock (a checkpoint folded into
the chunk store is folded under the VM's lock too): kept and dropped with its row. A VM with
a QEMU is asked in full at every scrape, as `cbsd bmetrics` asks every VM.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncinotify import Inotify, Mask, Watch

from cbsd.core.manage import listing, vmstats
from cbsd.core.manage.vmstats import VMStats
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.model import Status, VMSpec
from cbsd.storage import ckpstore
from cbsd.storage.paths import Workdir

# Rows that may be kept: nothing of the VM runs, so only a file can change them.
KEPT = (Status.OFF.value, Status.SUSPENDED.value)
# In the lock folder: a holder line written or emptied, a lock file made or deleted. Not OPEN:
# deriving a status opens the lock file itself.
LOCKS = Mask.MODIFY | Mask.CLOSE_WRITE | Mask.CREATE | Mask.DELETE | Mask.ONLYDIR
# In a VM's folder and its checkpoints folder: a file or folder appearing or going (the
# pidfile, the hibernation image, a checkpoint), or written and closed (the pidfile's pid).
# Not MODIFY: a running guest's console log (kept open) would flood the queue.
FILES = Mask.CREATE | Mask.DELETE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.CLOSE_WRITE \
    | Mask.ONLYDIR
GONE = Mask.IGNORED | Mask.DELETE_SELF | Mask.MOVE_SELF


@dataclass
class Kept:
    """What was derived of a VM with no QEMU from one inventory entry, while no file it is
    derived from changed: its list row, its metrics' facts, or both (each derived on first
    need: the list and the metrics are asked apart)."""

    entry: tuple[str, int, int]  # (definition text, pid, VNC port) it was derived from
    row: dict[str, Any] | None = None
    stats: VMStats | None = None


class RowCache:
    """Thread-safe: requests, the status watcher and operations' threads all look."""

    def __init__(self, workdir: Workdir) -> None:
        self.workdir = workdir
        self._lock = threading.Lock()
        self._kept: dict[str, Kept] = {}
        self._specs: dict[str, tuple[str, VMSpec | Exception]] = {}  # jname: (text, parsed)
        self._ino = Inotify(sync_timeout=0)  # sync_get(): None at once when nothing is queued
        self._owner: dict[Path, str] = {}  # watched folder -> the VM it belongs to
        self._watches: dict[str, list[Watch]] = {}
        self._top = False  # the lock folder and jails-system are watched (else none is kept)
        self.derived = 0  # rows derived in full so far (tests: what a look re-derived)

    def close(self) -> None:
        self._ino.close()

    def rows(self, ctx: Context) -> tuple[list[dict[str, Any]], list[str], list[str]]:
        """As listing.rows(ctx, None), each row with its checkpoint count."""
        with self._lock:
            self._watch_top()
            self._drain()
            out, notes, damaged = [], [], []
            entries = ctx.inventory.entries()
            for jname, text, pid, port in entries:
                spec = self._parse(ctx, jname, text)
                if not isinstance(spec, VMSpec):
                    damaged.append(str(spec))
                    continue
                kept = self._current(jname, (text, pid, port))
                if kept is not None and kept.row is not None:
                    out.append(kept.row)
                    continue
                # Watched before it is derived: a change while it is derived is an event.
                watched = self._top and self._watch(jname)
                row, note = listing.row(ctx, spec, pid, port)
                self.derived += 1
                row["checkpoints"] = ckpstore.count_states(self.workdir.checkpoints(jname))
                if note:
                    notes.append(note)
                    self._kept.pop(jname, None)
                else:
                    self._keep(jname, (text, pid, port), watched, row["status"], row=row)
                out.append(row)
            self._forget(set(self._specs) - {e[0] for e in entries})
            return [dict(r) for r in out], notes, damaged

    def stats(self, ctx: Context, *, timeout: float = vmstats.TIMEOUT,
              ) -> tuple[list[VMStats], list[str]]:
        """As vmstats.gather(ctx): the facts of a VM whose row may be kept (see above) are
        kept too; the others are asked, in parallel, as gather asks them."""
        with self._lock:
            self._watch_top()
            self._drain()
            entries = ctx.inventory.entries()
            out: list[VMStats | None] = []
            damaged: list[str] = []
            asked: list[tuple[int, VM, tuple[str, int, int], bool]] = []
            for jname, text, pid, port in entries:
                spec = self._parse(ctx, jname, text)
                if not isinstance(spec, VMSpec):
                    damaged.append(f"{jname}: {spec}")
                    continue
                kept = self._current(jname, (text, pid, port))
                if kept is not None and kept.stats is not None:
                    out.append(kept.stats)
                    continue
                # Watched before it is derived, as for a row.
                watched = self._top and self._watch(jname)
                asked.append((len(out), VM(ctx, spec, (pid, port)), (text, pid, port), watched))
                out.append(None)
            for (i, vm, entry, watched), stats in zip(
                    asked, vmstats.each([a[1] for a in asked], timeout), strict=True):
                out[i] = stats
                self.derived += 1
                self._keep(vm.jname, entry, watched, stats.status.value, stats=stats)
            self._forget(set(self._specs) - {e[0] for e in entries})
            return [s for s in out if s is not None], damaged

    def _current(self, jname: str, entry: tuple[str, int, int]) -> Kept | None:
        """What is kept of *jname* if it was derived from *entry* (else it is dropped)."""
        kept = self._kept.get(jname)
        if kept is not None and kept.entry != entry:
            del self._kept[jname]
            return None
        return kept

    def _keep(self, jname: str, entry: tuple[str, int, int], watched: bool, status: str, *,
              row: dict[str, Any] | None = None, stats: VMStats | None = None) -> None:
        """Keep what was just derived of *jname* if nothing of it runs and its folders are
        watched; what was kept from the same entry stays beside it only if it says the
        same status (no event came between them: it must)."""
        if not (watched and status in KEPT):
            self._kept.pop(jname, None)
            return
        kept = self._current(jname, entry)
        if kept is None:
            kept = self._kept[jname] = Kept(entry)
        if row is not None:
            kept.row = row
            if kept.stats is not None and kept.stats.status.value != status:
                kept.stats = None
        if stats is not None:
            kept.stats = stats
            if kept.row is not None and kept.row["status"] != status:
                kept.row = None

    def _parse(self, ctx: Context, jname: str, text: str) -> VMSpec | Exception:
        """The entry's definition, parsed again only when its text changed (the parse checks
        every key: most of a look's cost when nothing else changed)."""
        old = self._specs.get(jname)
        if old is not None and old[0] == text:
            return old[1]
        spec = ctx.inventory.parse(jname, text)
        self._specs[jname] = (text, spec)
        return spec

    def _watch_top(self) -> None:
        if not self._top:
            with contextlib.suppress(OSError):  # not made yet: no row is kept
                self._ino.add_watch(self.workdir.locks, LOCKS)
                self._ino.add_watch(self.workdir.root / "jails-system", FILES)
                self._top = True

    def _watch(self, jname: str) -> bool:
        """Watch the VM's folder and its checkpoints folder (each once, when it exists: the
        creation of either is an event in the folder above, after which the row is derived
        again and this called again); False if the VM's folder exists but is not watched
        (its row is not kept then)."""
        watches = self._watches.setdefault(jname, [])
        for folder in (self.workdir.system(jname), self.workdir.checkpoints(jname)):
            if folder in self._owner:
                continue
            try:
                watches.append(self._ino.add_watch(folder, FILES | GONE))
            except OSError:  # not there (yet)
                continue
            self._owner[folder] = jname
        system = self.workdir.system(jname)
        return system in self._owner or not system.exists()

    def _drain(self) -> None:
        """Forget the kept row of every VM a queued event may concern."""
        while True:
            event = self._ino.sync_get()
            if event is None:
                return
            if Mask.Q_OVERFLOW in event.mask:  # events were lost: anything may have changed
                self._kept.clear()
                continue
            folder = event.watch.path if event.watch is not None else None
            jname = self._owner.get(folder) if folder is not None else None
            if jname is None and event.name is not None:
                if folder == self.workdir.locks:
                    jname = _lock_owner(str(event.name))
                    if jname is None:
                        self._kept.clear()  # a file there this does not know: re-derive all
                        continue
                elif folder == self.workdir.root / "jails-system":
                    jname = str(event.name)  # a VM's folder made, deleted or renamed
            if jname is None:
                continue
            self._kept.pop(jname, None)
            if event.mask & GONE:  # the folder is gone: watch it again when it is back
                self._unwatch(jname)

    def _unwatch(self, jname: str) -> None:
        for w in self._watches.pop(jname, []):
            self._owner.pop(w.path, None)
            with contextlib.suppress(OSError, ValueError):
                self._ino.rm_watch(w)

    def _forget(self, gone: set[str]) -> None:
        for jname in gone:
            self._specs.pop(jname, None)
            self._kept.pop(jname, None)
            self._unwatch(jname)


def _lock_owner(name: str) -> str | None:
    """The VM a file in the lock folder belongs to: JNAME.lock, or JNAME.lock.yield (a
    background fold's request to give way: core/vm/lock.py)."""
    for suffix in (".lock", ".lock.yield"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return None
