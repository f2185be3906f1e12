"""The event stream: GET /1.0/events (Server-Sent Events, text/event-stream).

Each event is one JSON object `{"type": "lifecycle"|"operation", "timestamp", "metadata"}`:
an operation's start, progress and end, and a VM's status change. Status changes are found
whoever made them (this service or a CLI command): a watcher compares the VMs' statuses when
inotify reports a change of a file a status change touches (StatusWatcher._watch: no polling,
so no measurable CPU when idle) and after each operation ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from asyncinotify import Event, Inotify, Mask
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from cbsd.core.vm.context import Context
from cbsd.service.rowcache import RowCache
from cbsd.storage.paths import Workdir

POLL = 0.1  # seconds between looks while a VM is in Maintenance
BURST = 0.01  # seconds of quiet that end a burst of file events
FULL_LOOK = 30.0  # seconds between looks at every VM's status whatever the files say
KEEPALIVE = 15.0  # seconds between comments on an idle stream (proxies close silent ones)
QUEUE = 1000  # events a slow subscriber may fall behind before it is dropped

router = APIRouter()


class Bus:
    """Fan-out of events to every subscriber's queue; publish() may be called from any
    thread (operations run in threads), delivery happens on the service's event loop."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, kind: str, metadata: dict[str, Any]) -> None:
        event = {"type": kind, "timestamp": time.time(), "metadata": metadata}
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: dict[str, Any]) -> None:
        for q in list(self._subscribers):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:  # a subscriber that does not read is ended
                self._subscribers.discard(q)
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(None)

    def close(self) -> None:
        """End every subscriber's stream (the service is stopping: open streams would keep
        uvicorn waiting for them)."""
        for q in list(self._subscribers):
            self._subscribers.discard(q)
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)

    async def subscribe(self) -> AsyncIterator[dict[str, Any] | None]:
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE)
        self._subscribers.add(q)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(q.get(), KEEPALIVE)
                except TimeoutError:
                    yield None  # keep-alive
                    continue
                if event is None:
                    return
                yield event
        finally:
            self._subscribers.discard(q)


class StatusWatcher:
    """Publishes a lifecycle event for each VM whose status differs from the last look."""

    def __init__(self, workdir: Workdir, bus: Bus, rows: RowCache) -> None:
        self.workdir = workdir
        self.bus = bus
        self.rows = rows
        self._last: dict[str, str] = {}
        self._lock = threading.Lock()
        self._watched: set[Path] = set()
        self.look()

    def statuses(self) -> dict[str, str]:
        """Every VM's status: derived again only for the VMs whose files changed and those
        with a QEMU (RowCache: the API's list shares it)."""
        ctx = Context(self.workdir, writable=False)
        try:
            return {row["jname"]: row["status"] for row in self.rows.rows(ctx)[0]}
        finally:
            if "inventory" in ctx.__dict__:
                ctx.inventory.close()

    def look(self) -> None:
        with self._lock:
            now = self.statuses()
            for jname, status in now.items():
                if self._last.get(jname) != status:
                    self.bus.publish("lifecycle", {"name": jname, "status": status,
                                                   "previous": self._last.get(jname)})
            for jname in self._last.keys() - now.keys():
                self.bus.publish("lifecycle", {"name": jname, "status": "Deleted",
                                               "previous": self._last[jname]})
            self._last = now

    def _watch(self, ino: Inotify) -> None:
        """Watch what a status change touches: the VMs' lock files (a command writes its
        holder line on taking a lock, empties it and closes the file on release), the
        inventory (and its WAL), and each VM's folder for QEMU's pidfile and the hibernation
        image coming and going (not its console log: a guest printing must not wake the
        service). A look derives again only the VMs these changed (and those with a QEMU):
        the RowCache it shares with the list has its own inotify queue for that."""
        wd = self.workdir
        # CLOSE_WRITE: the holder's close is what releases the lock, just after it emptied
        # its line (MODIFY): the look that follows sees the lock free (status readers open
        # the lock file read-only: no CLOSE_WRITE of theirs wakes the watcher).
        wanted = {wd.locks: Mask.MODIFY | Mask.CLOSE_WRITE | Mask.CREATE | Mask.DELETE,
                  # MODIFY only: a reader (this watcher's look too) creates and deletes the WAL
                  wd.inventory.parent: Mask.MODIFY,
                  wd.root / "jails-system": Mask.CREATE | Mask.DELETE}
        for jname in self._last:
            wanted[wd.system(jname)] = Mask.CREATE | Mask.DELETE | Mask.MOVED_TO
        for path, mask in wanted.items():
            if path not in self._watched:
                with contextlib.suppress(OSError):  # a folder not made yet: next look
                    ino.add_watch(path, mask | Mask.ONLYDIR)
                    self._watched.add(path)

    async def run(self) -> None:
        """Look when inotify reports a change (a burst of events gives one look), again every
        POLL while a VM is in Maintenance (its lock is released just after the holder line
        is emptied), and every FULL_LOOK s for what changes no file. Idle: no wake-ups but
        the FULL_LOOK."""
        with Inotify() as ino:
            self._watch(ino)
            while True:
                busy = "Maintenance" in self._last.values()
                with contextlib.suppress(TimeoutError):
                    while not _relevant(await asyncio.wait_for(
                            ino.get(), POLL if busy else FULL_LOOK)):
                        pass
                    with contextlib.suppress(TimeoutError):
                        for _ in range(1000):  # the rest of the burst
                            await asyncio.wait_for(ino.get(), BURST)
                await asyncio.to_thread(self.look)
                self._watch(ino)


def _relevant(event: Event) -> bool:
    """Not SQLite's shared-memory index: every reader writes it, the watcher's own look too
    (it would wake itself forever)."""
    return not (event.name is not None and str(event.name).endswith("-shm"))


@router.get("/1.0/events", summary="The event stream (Server-Sent Events)")
async def events(request: Request) -> StreamingResponse:
    bus: Bus = request.app.state.bus

    async def stream() -> AsyncIterator[bytes]:
        yield b": cbsd events\n\n"  # headers and a first line at once: the client knows
        async for event in bus.subscribe():
            if await request.is_disconnected():
                return
            yield (b": keep-alive\n\n" if event is None
                   else f"data: {json.dumps(event)}\n\n".encode())

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})
