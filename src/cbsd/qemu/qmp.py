"""A small synchronous facade over qemu.qmp's asyncio QMPClient, for a one-shot CLI."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from cbsd import cancel
from cbsd.errors import QemuError

T = TypeVar("T")


class Monitor:
    """One QMP session to one VM. Every failure becomes a QemuError naming the command."""

    def __init__(self, path: Path, jname: str, timeout: float = 30.0) -> None:
        # Lazy: asyncio and qemu.qmp cost ~25 ms, which `cbsd bls` of stopped VMs never needs.
        import asyncio
        import logging

        from qemu.qmp import QMPClient

        # qemu.qmp logs protocol chatter; our errors are raised and reported by the CLI.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL + 1)
        self.jname = jname
        self.timeout = timeout
        self.closed = False
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(f"cbsd-{jname}")
        try:
            self._run(self._client.connect(str(path)), 10.0)
        except Exception as e:
            self._loop.close()
            raise QemuError(f"{jname}: cannot reach QEMU's monitor at {path}: {e}") from e

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        import asyncio

        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout or self.timeout))

    def cmd(self, command: str, /, **args: Any) -> Any:
        from qemu.qmp import ExecuteError

        try:
            return self._run(self._client.execute(command, args or None))
        except ExecuteError as e:
            raise QemuError(f"{self.jname}: QEMU refused {command}: {e.error_message}") from e
        except TimeoutError as e:
            raise QemuError(f"{self.jname}: QEMU did not answer {command} in time") from e
        except Exception as e:
            raise QemuError(f"{self.jname}: lost QEMU's monitor during {command}: {e}") from e

    def send_fd(self, fd: int, name: str) -> None:
        """Hand an open file to QEMU (SCM_RIGHTS + getfd) under *name*."""
        try:
            self._client.send_fd_scm(fd)
        except OSError as e:
            raise QemuError(f"{self.jname}: lost QEMU's monitor while passing a file: "
                            f"{e.strerror or e}") from e
        self.cmd("getfd", fdname=name)

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def running(self) -> bool:
        return bool(self.cmd("query-status")["running"])

    def wait_migration(self, incoming: bool = False, progress: Any = None) -> dict[str, Any]:
        """Poll query-migrate until the migration ends; raise QemuError if it failed."""
        delay = 0.002
        while True:
            info = self.cmd("query-migrate")
            state = info.get("status")
            if state == "completed":
                return dict(info)
            if state in ("failed", "cancelled"):
                raise QemuError(f"{self.jname}: saving/loading the state failed: "
                                f"{info.get('error-desc', state)}")
            if incoming and state is None and self.status() != "inmigrate":
                return dict(info)
            if progress is not None and "ram" in info:
                progress(info["ram"])
            cancel.check()
            time.sleep(delay)
            delay = min(delay * 2, 0.005)  # a QMP query costs <1 ms; oversleeping costs more

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect(), 5.0)
        self._loop.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_fd_for(path: Path, write: bool) -> int:
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL) if write else os.O_RDONLY
    return os.open(path, flags | os.O_CLOEXEC, 0o600)
