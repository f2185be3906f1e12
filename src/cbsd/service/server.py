"""run(config): the service's listeners, uvicorn serving one app on
- the workdir's Unix socket (mode 0660, group cbsd where it exists; its peers are trusted), and
- when asked (listen=ADDRESS:PORT), TCP with TLS: a self-signed certificate made on first start,
  client certificates verified against <workdir>/service/trusted-clients.pem when sent.

Stopping or killing this process never touches a VM: QEMU runs -daemonize (its own session,
re-parented to init), so it is no child of the service's; the systemd unit stops only the
service's own process (KillMode=process). On SIGTERM/SIGINT every running operation is
cancelled and given ROLLBACK_WAIT s to roll back, as a CLI command on SIGTERM; one killed
halfway (kill -9) is recovered as a killed CLI command is (operations.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from cbsd.errors import BusyError, UsageError
from cbsd.service import auth
from cbsd.service.app import Config, create_app

GRACE = 5  # seconds
ROLLBACK_WAIT = 60  # seconds a stopping service gives cancelled operations to roll back

Scope = MutableMapping[str, Any]
ASGI = Callable[[Scope, Any, Any], Awaitable[None]]


def tagged(app: ASGI, **tags: Any) -> ASGI:
    """*app*, with *tags* added to every request's scope (which listener it came through)."""
    async def wrapped(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope.update(tags)
        await app(scope, receive, send)
    return wrapped


class CertProtocol(H11Protocol):
    """HTTP over TLS that tells the app whether the client presented a certificate the
    handshake verified (uvicorn does not put that into the scope itself)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        verified = bool(transport.get_extra_info("peercert"))
        self.app = tagged(self.app, **{"cbsd.client_cert": verified})


class Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: run() stops every listener on
    SIGINT/SIGTERM (uvicorn's would stop one, and re-raise the signal on its way out)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        """uvicorn's loop, woken once a second instead of ten times: its tick refreshes the
        Date header once a second (every tenth tick) and checks should_exit, so ten ticks at
        a time keep both as they were, and an idle service wakes no more than that (the ten
        wake-ups a second were most of its idle CPU). A stop takes effect within a second."""
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000
            await asyncio.sleep(1.0)
            should_exit = await self.on_tick(counter)


def unix_socket(path: Path) -> socket.socket:
    """The listening socket, made with its final mode (no window where others may connect)."""
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
            raise BusyError(f"serve: a service already listens on {path}")
        except OSError:
            path.unlink()  # left by a killed service
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    gid = auth.socket_group()
    if gid is not None:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    sock.listen(128)
    return sock


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"serve: listen={value}: expected ADDRESS:PORT")
    return host.strip("[]"), int(port)


def run(config: Config) -> None:
    app = create_app(config)
    sock = unix_socket(auth.socket_path(config.workdir))
    # A stop waits GRACE s at most for requests still running (operations go on in their
    # threads until the process ends: they are left as a killed command leaves them).
    quiet: dict[str, Any] = {"log_level": "warning", "lifespan": "on", "access_log": False,
                             "timeout_graceful_shutdown": GRACE}
    servers = [(Server(uvicorn.Config(
        tagged(app, **{"cbsd.transport": "unix"}), **quiet)), [sock])]
    if config.listen:
        host, port = parse_listen(config.listen)
        cert, key = auth.server_certificate(config.workdir)
        trusted = auth.trusted_clients(config.workdir)
        servers.append((Server(uvicorn.Config(
            tagged(app, **{"cbsd.transport": "tcp"}), host=host, port=port,
            ssl_certfile=str(cert), ssl_keyfile=str(key), http=CertProtocol,
            ssl_cert_reqs=ssl.CERT_OPTIONAL if trusted.exists() else ssl.CERT_NONE,
            ssl_ca_certs=str(trusted) if trusted.exists() else None,
            lifespan="off", log_level="warning", access_log=False,
            timeout_graceful_shutdown=GRACE)), []))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        await asyncio.gather(*(s.serve(sockets=socks or None) for s, socks in servers))

    def stop() -> None:
        # As SIGTERM to a CLI command: each running operation is cancelled and rolls back.
        for op in app.state.operations.all():
            app.state.operations.cancel(op, "cancelled: the service is stopping")
        app.state.bus.close()
        for s, _ in servers:
            s.should_exit = True

    try:
        asyncio.run(main())
    finally:
        with contextlib.suppress(OSError):
            auth.socket_path(config.workdir).unlink()
        deadline = time.monotonic() + ROLLBACK_WAIT
        for op in app.state.operations.all():
            op.finished.wait(max(0.0, deadline - time.monotonic()))
