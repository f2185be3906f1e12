"""The event stream: GET /1.0/events (Server-Sent Events, text/event-stream).

Each event is one JSON object `{"type": "lifecycle"|"operation", "timestamp", "metadata"}`:
an operation's start, progress and end, and a VM's status change. Status changes are found
whoever made them (this service or a CLI command): a watcher compares the VMs' statuses when
a file it touches changes (StatusWatcher.signature: a few stats every POLL seconds, no
measurable CPU when idle) and after each operation ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.model import VMSpec
from cbsd.storage.paths import Workdir

POLL = 0.1  # seconds between looks at the files a status change touches (see signature)
FULL_LOOK = 10.0  # seconds between looks at every VM's status whatever the files say
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

    def __init__(self, workdir: Workdir, bus: Bus) -> None:
        self.workdir = workdir
        self.bus = bus
        self._last: dict[str, str] = {}
        self._lock = threading.Lock()
        self.look()

    def statuses(self) -> dict[str, str]:
        ctx = Context(self.workdir, writable=False)
        try:
            return {j: VM(ctx, spec, (pid, port)).status().value
                    for j, spec, pid, port in ctx.inventory.all() if isinstance(spec, VMSpec)}
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

    def signature(self) -> tuple[float, ...]:
        """The mtimes that change when a VM's status may have: the inventory (and its WAL)
        and every VM's lock file (a command writes its holder line on taking the lock and
        empties it on release). One stat each: cheap enough every POLL."""
        wd = self.workdir
        found: list[float] = []
        for path in (wd.inventory, wd.inventory.with_name(wd.inventory.name + "-wal")):
            with contextlib.suppress(OSError):
                found.append(path.stat().st_mtime)
        with contextlib.suppress(OSError), os.scandir(wd.locks) as entries:
            found += [e.stat().st_mtime for e in entries]
        return tuple(found)

    async def run(self) -> None:
        """Look whenever a file in signature() changes; again while a VM is in Maintenance
        (its lock is released just after the holder line is emptied); and every FULL_LOOK
        seconds for what changes no file (a guest that powers itself off)."""
        last, since = self.signature(), time.monotonic()
        while True:
            await asyncio.sleep(POLL)
            now = await asyncio.to_thread(self.signature)
            busy = "Maintenance" in self._last.values()
            if now != last or busy or time.monotonic() - since > FULL_LOOK:
                last, since = now, time.monotonic()
                await asyncio.to_thread(self.look)


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
