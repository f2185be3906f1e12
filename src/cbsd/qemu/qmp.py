"""QEMU's monitor protocol (QMP), spoken synchronously over its Unix socket.

Why not the qemu.qmp library: it is an asyncio client, and importing it (asyncio, ssl, logging)
costs 80-100 ms on these hosts -- four times what the whole of `virsh suspend` takes, and more
than the rest of `cbsd bpause`. cbsd never needs what asyncio buys: one CLI command talks to one
QEMU, one request at a time, and it polls (query-migrate, query-status) instead of waiting for
events. What QMP needs from a client for that is small and fixed by QEMU's spec
(docs/interop/qmp-spec): read the greeting, send `qmp_capabilities`, then one JSON object per
request; replies carry the request's `id`; asynchronous events (`{"event": ...}`) may arrive in
between and are skipped. File descriptors travel with a request as SCM_RIGHTS ancillary data.

The imports are kept to what a pause needs (bpause's quick lane, cbsd/cli/quick.py, runs in
less time than `import socket, json` takes): the C halves of both modules. `socket` adds enum
constants and selectors; `json` imports `re` for whitespace handling it does not need here.
Requests with arguments are rare and slow anyway (migrations): they load `json` to encode.
"""

from __future__ import annotations

import os
import struct
import time
from _socket import AF_UNIX, SCM_RIGHTS, SOCK_CLOEXEC, SOCK_STREAM, SOL_SOCKET
from _socket import socket as _socket

from cbsd import cancel, debug
from cbsd.errors import MigrationFailed, QemuError, QmpCommandError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

# QEMU sends at most a few KiB per reply; a line longer than this is not QMP.
_MAX_LINE = 16 * 1024 * 1024


class _JSONContext:
    """The settings json.loads passes to its C scanner (json.decoder.JSONDecoder's defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # 'NaN', 'Infinity', '-Infinity': float() reads all three


def _json_loads() -> Callable[[bytes], Any]:
    try:
        # lazy: tried here, falling back to json (too heavy for the pause lane)
        from _json import make_scanner
    except ImportError:  # a Python without the C accelerator: the real thing
        # lazy: json is too heavy for the pause lane; the lane's requests need none
        import json

        return json.loads
    # The C scanner reads only these attributes of the decoder it is given (typeshed types
    # the argument as the scanner class itself).
    scan = make_scanner(_JSONContext())  # type: ignore[arg-type]

    def loads(line: bytes) -> Any:
        text = line.decode()
        start = len(text) - len(text.lstrip())
        try:
            value, end = scan(text, start)
        except StopIteration as e:
            raise ValueError(f"no JSON value at {e.value}") from None
        if text[end:].strip():
            raise ValueError(f"extra data at {end}")
        return value

    return loads


_loads = _json_loads()


def _encode(request: dict[str, Any]) -> bytes:
    if set(request) == {"execute", "id"}:  # a bare command name, one of cbsd's own literals
        return b'{"execute": "%s", "id": %d}\n' % (request["execute"].encode(), request["id"])
    # lazy: json is too heavy for the pause lane; the lane's requests need none
    import json

    return json.dumps(request).encode() + b"\n"


class _Lost(Exception):
    """The socket closed or broke, or what came back was not QMP."""


def _redacted(req: dict[str, Any]) -> dict[str, Any]:
    if req.get("execute") == "set_password":
        return {**req, "arguments": {**req.get("arguments", {}), "password": "***"}}
    return req


def _why(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


class Monitor:
    """One QMP session to one VM. Every failure becomes a QemuError naming the command."""

    def __init__(self, path: str | Path, jname: str, timeout: float = 30.0,
                 connect_timeout: float = 10.0) -> None:
        self.jname = jname
        self.timeout = connect_timeout  # for the greeting and the negotiation
        self.closed = False
        self._next_id = 0
        self._buf = bytearray()
        self._sock = _socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)
        try:
            self._sock.settimeout(connect_timeout)
            self._sock.connect(str(path))
            if "QMP" not in self._read():
                raise _Lost("no QMP greeting")
            self._exchange("qmp_capabilities", None)
            self.timeout = timeout
        except (OSError, _Lost) as e:
            self.close()
            reason = "it did not answer in time" if isinstance(e, TimeoutError) else _why(e)
            raise QemuError(f"{jname}: cannot reach QEMU's monitor at {path}: {reason}") from e

    def _read(self) -> dict[str, Any]:
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > _MAX_LINE:
                raise _Lost("an overlong reply")
            chunk = self._sock.recv(65536)
            if not chunk:
                raise _Lost("the connection closed")
            self._buf += chunk
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        try:
            msg = _loads(line)
        except ValueError as e:
            raise _Lost(f"a reply that is not JSON ({e})") from e
        if not isinstance(msg, dict):
            raise _Lost("a reply that is not a JSON object")
        return msg

    def _exchange(self, command: str, args: dict[str, Any] | None, fd: int | None = None) -> Any:
        self._next_id += 1
        req: dict[str, Any] = {"execute": command, "id": self._next_id}
        if args:
            req["arguments"] = args
        data = _encode(req)
        if debug.ON:
            debug.log("qmp", f"{self.jname} --> {_redacted(req)}" + (" +fd" if fd else ""))
        self._sock.settimeout(self.timeout)
        if fd is None:
            self._sock.sendall(data)
        else:
            # The fd must arrive with the request's own bytes: QEMU attaches it to that read.
            rights = [(SOL_SOCKET, SCM_RIGHTS, struct.pack("@i", fd))]
            sent = self._sock.sendmsg([data], rights)
            if sent < len(data):  # a send of nothing fails once the peer has replied and gone
                self._sock.sendall(data[sent:])
        while True:
            msg = self._read()
            if debug.ON:
                debug.log("qmp", f"{self.jname} <-- {msg}")
            if msg.get("id") != self._next_id:
                continue  # an event, or (never expected) a stale reply
            if "error" in msg:
                err = msg["error"]
                if not isinstance(err, dict):
                    err = {"desc": str(err)}
                raise QmpCommandError(self.jname, command, str(err.get("class", "")),
                                      str(err.get("desc", err)))
            if "return" not in msg:
                raise _Lost(f"a reply to {command} without a result")
            return msg["return"]

    def cmd(self, command: str, /, **args: Any) -> Any:
        return self._call(command, args, None, f"during {command}")

    def send_fd(self, fd: int, name: str) -> None:
        """Hand an open file to QEMU (SCM_RIGHTS with `getfd`) under *name*."""
        self._call("getfd", {"fdname": name}, fd, "while passing a file")

    def add_fd(self, fd: int, fdset: int | None = None) -> dict[str, Any]:
        """Hand an open file to QEMU into a new fdset, or into *fdset* (`add-fd`); returns
        its fdset-id."""
        args = {} if fdset is None else {"fdset-id": fdset}
        return dict(self._call("add-fd", args, fd, "while passing a file"))

    def _call(self, command: str, args: dict[str, Any], fd: int | None, during: str) -> Any:
        if self.closed:
            raise QemuError(f"{self.jname}: QEMU's monitor is closed; cannot send {command}")
        try:
            return self._exchange(command, args, fd)
        except TimeoutError as e:
            self.close()  # a late reply would be taken for the next command's
            raise QemuError(f"{self.jname}: QEMU did not answer {command} in time") from e
        except (OSError, _Lost) as e:
            self.close()
            raise QemuError(f"{self.jname}: lost QEMU's monitor {during}: {_why(e)}") from e

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def running(self) -> bool:
        return bool(self.cmd("query-status")["running"])

    def wait_migration(self, progress: Any = None) -> dict[str, Any]:
        """Poll query-migrate until an outgoing migration ends; QemuError if it failed."""
        # bpause's quick lane imports this module and never waits for a migration:
        # lazy: enum (the quick lane must not pay for it, cbsd/core/vm/pause.py)
        from cbsd.qemu.runstate import MigrationStatus

        delay = 0.002
        while True:
            info = self.cmd("query-migrate")
            state = info.get("status")
            if state == MigrationStatus.COMPLETED:
                return dict(info)
            if state in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
                raise MigrationFailed(self.jname, str(state), str(info.get("error-desc", "")))
            if progress is not None and "ram" in info:
                progress(info["ram"])
            cancel.check()
            time.sleep(delay)
            delay = min(delay * 2, 0.005)  # a QMP query costs <1 ms; oversleeping costs more

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._sock.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_fd_for(path: Path, write: bool) -> int:
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL) if write else os.O_RDONLY
    return os.open(path, flags | os.O_CLOEXEC, 0o600)
