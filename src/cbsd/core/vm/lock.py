"""Per-VM locks.

fcntl.flock is released by the kernel when its holder dies (even by kill -9), so a stale lock
can never block a VM: the next command simply gets it. The holder writes its pid and command
into the file, so a busy error can say who holds the VM, and empties it when it releases the
lock: text found in the file on acquiring means the last holder died mid-command (`died`).

A background job that can stop at any moment (folding checkpoints into the chunk store) holds
the lock as a *yielding* holder: its line ends with YIELDS. A command that finds one asks it
to give way (a `.yield` file beside the lock) and waits for it, instead of reporting the VM
busy; a status probe does not count it as Maintenance.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from cbsd.errors import BusyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from pathlib import Path
    from typing import Any


HOLDER_GRACE = 0.5
YIELDS = "(yields)"
YIELD_WAIT = 10.0  # a yielding holder checks for the request every few milliseconds


class VMLock:
    def __init__(self, path: str | Path, jname: str, what: str) -> None:
        self.path = path
        self.jname = jname
        self.what = what
        self._fd = -1
        self._guard: AbstractContextManager[None] | None = None
        self.died = ""  # "PID COMMAND" of a previous holder that never released the lock

    def acquire(self, wait: float = 0.0) -> VMLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            # lazy: only a failure's message; the pause lane imports lock (atomic: pathlib)
            from cbsd.storage.atomic import os_error

            raise os_error(e, f"{self.jname}: cannot open its lock file {self.path}") from e
        deadline = time.monotonic() + wait
        # A holder that wrote nothing (yet) is a status probe (is_held: microseconds) or a
        # command between taking the lock and writing its line: worth a short wait.
        anonymous = time.monotonic() + HOLDER_GRACE
        asked = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fd)
                now = time.monotonic()
                yielding = YIELDS in holder and YIELDS not in self.what
                if yielding:
                    # Asked again each time: a holder that took the lock after our first
                    # request cleared it as stale.
                    with contextlib.suppress(OSError), open(yield_file(self.path), "w"):
                        pass
                    if not asked:
                        asked = True
                        deadline = max(deadline, now + YIELD_WAIT)
                if now >= deadline and (holder or now >= anonymous):
                    os.close(fd)
                    raise BusyError(f"{self.jname}: busy: another cbsd command holds it"
                                    f"{holder or ' (it has not said which yet)'}") from None
                time.sleep(0.002 if yielding else 0.01 if not holder else 0.05)
        if asked:
            with contextlib.suppress(OSError):
                os.unlink(yield_file(self.path))
        self.died = os.pread(fd, 200, 0).decode(errors="replace").strip()
        line = f"{os.getpid()} {self.what}\n".encode()
        try:
            # Write, then cut to length: a reader never sees the file empty while it is held.
            os.pwrite(fd, line, 0)
            os.ftruncate(fd, len(line))
        except OSError:
            pass  # a full disk: the lock holds all the same, only its holder goes unnamed
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, 0)  # empty: this holder ended normally (see `died`)
            finally:
                os.close(self._fd)  # closing releases the flock
                self._fd = -1

    def hold_in(self, guard: AbstractContextManager[None]) -> None:
        """Enter *guard* now and leave it (with the command's outcome) before the lock is
        released: the cluster's ownership guard (Context.lock)."""
        guard.__enter__()
        self._guard = guard

    def __enter__(self) -> VMLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        guard, self._guard = self._guard, None
        try:
            if guard is not None:
                guard.__exit__(*exc)
        finally:
            self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    pid, _, what = text.partition(" ")
    return f" ({what}, pid {pid})" if pid else ""


PROBE_GRACE = 0.1  # how long a status probe waits for a new holder to name itself


def is_held(path: Path) -> bool:
    """True while another process holds the VM's lock (status Maintenance), unless it is a
    yielding holder (it gives way to any command). A holder that has not named itself yet
    (between its flock and its line: microseconds, more on a loaded host) is given
    PROBE_GRACE to say whether it yields: a background fold starting must not show as
    Maintenance."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        deadline = time.monotonic() + PROBE_GRACE
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                holder = _read_holder(fd)
                if holder or time.monotonic() >= deadline:
                    return YIELDS not in holder
                time.sleep(0.005)
    finally:
        os.close(fd)


def yield_file(lock_path: str | Path) -> str:
    return f"{lock_path}.yield"


def asked_to_yield(lock_path: str | Path) -> bool:
    return os.path.exists(yield_file(lock_path))
