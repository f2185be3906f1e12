"""The two WebSockets the web UI's VM page opens: the serial console and the VNC display.

Each relays bytes both ways between the WebSocket and what QEMU already serves for the VM: its
serial console's Unix socket (the one `blogin` attaches to, paths.console_sock) and its VNC
server on 127.0.0.1 (the port the inventory records at start). Nothing new listens: QEMU's VNC
stays on the loopback, and reaching it from a browser goes through the service's
authentication (a session, a token or the Unix socket) and the Origin check
(ui.websocket_user).
Like blogin, the console has one user at a time: QEMU serves one client on that socket, and a
second waits until the first leaves.

A WebSocket that is refused is closed before it is accepted (the browser sees HTTP 403); one
whose VM is not running is accepted and closed at once with code 4404 and the reason in
words, which the page shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from cbsd.core.vm.context import Context
from cbsd.errors import CbsdError
from cbsd.names import check_name
from cbsd.service import ui

router = APIRouter()

NOT_RUNNING = 4404  # WebSocket close code: the VM has no console/VNC to reach now
CHUNK = 65536
RECENT = 4096  # bytes of the console's recent output a new viewer is shown first


async def _relay(ws: WebSocket, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    """Bytes both ways until either side ends; then both are closed."""

    async def out() -> None:
        while data := await reader.read(CHUNK):
            await ws.send_bytes(data)

    async def into() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                data = msg.get("bytes") or (msg.get("text") or "").encode()
                writer.write(data)
                await writer.drain()

    tasks = [asyncio.ensure_future(out()), asyncio.ensure_future(into())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        with contextlib.suppress(RuntimeError, OSError):
            await ws.close(1000, "the VM's side ended")


Opener = Callable[[Context, str], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def _serve(ws: WebSocket, name: str, what: str, opener: Opener,
                 history: bool = False) -> None:
    if ui.websocket_user(ws) is None:
        await ws.close(1008)  # before accept: HTTP 403
        return
    protocols = ws.scope.get("subprotocols") or []
    await ws.accept(subprotocol="binary" if "binary" in protocols else None)
    try:
        check_name(name)
        ctx = Context(ui.workdir(ws.app), writable=False)
        try:
            ctx.spec(name)
            reader, writer = await opener(ctx, name)
        finally:
            if "inventory" in ctx.__dict__:
                ctx.inventory.close()
    except (CbsdError, OSError) as e:
        reason = str(e) if isinstance(e, CbsdError) else f"{name} has no {what} now (not running?)"
        await ws.close(NOT_RUNNING, reason[:120])  # a close reason is at most 123 bytes
        return
    if history and (recent := recent_output(ui.workdir(ws.app).console_log(name))):
        await ws.send_bytes(recent)
    await _relay(ws, reader, writer)


async def _open_console(ctx: Context, name: str) -> tuple[asyncio.StreamReader,
                                                          asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(ctx.workdir.console_sock(name)))


def recent_output(log: Path) -> bytes:
    """The end of the console's log (QEMU writes all the guest prints there, attached or not),
    from a line's start: what the guest printed just before the page attached (a login
    prompt, the lines since a restore). Read after the socket is connected, so nothing falls
    between the two; a line printed meanwhile may show twice."""
    try:
        with log.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - RECENT))
            data = f.read(RECENT)
    except OSError:
        return b""
    cut = data.find(b"\n")
    return data[cut + 1:] if len(data) == RECENT and cut >= 0 else data


async def _open_vnc(ctx: Context, name: str) -> tuple[asyncio.StreamReader,
                                                      asyncio.StreamWriter]:
    _, port = ctx.inventory.runtime(name)
    if not port:
        raise CbsdError(f"{name} has no VNC display (vnc=1, and running)")
    bind = ctx.spec(name).vnc_bind  # 127.0.0.1 unless the VM's vnc_bind says otherwise
    return await asyncio.open_connection(
        "127.0.0.1" if bind in ("", "0.0.0.0", "::") else bind.strip("[]"), port)


@router.websocket("/1.0/instances/{name}/console")
async def console(ws: WebSocket, name: str) -> None:
    await _serve(ws, name, "serial console", _open_console, history=True)


@router.websocket("/1.0/instances/{name}/vnc")
async def vnc(ws: WebSocket, name: str) -> None:
    await _serve(ws, name, "VNC display", _open_vnc)
