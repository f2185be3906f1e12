"""The guest's filesystems frozen for the instant of a disk snapshot, and never left frozen.

`guest-fsfreeze-freeze` makes the guest flush and block every write to its filesystems until
`guest-fsfreeze-thaw`; a snapshot taken in between is application-consistent. qemu-guest-agent
on Linux has no timeout of its own: a guest whose thaw never comes stays frozen (every write,
a log line, a login, waits). So the thaw may not depend on the command that froze it living:

  - the freeze file, jails-system/VM/fsfrozen, holds a random token from before the freeze
    until after the thaw; whoever freezes or thaws holds its flock meanwhile (so a thaw can
    never land inside another command's freeze);
  - before the freeze, the command starts a detached guard that holds the read end of a pipe
    whose write end only the command has. The command thaws, clears the token and writes
    "thawed" into the pipe; any other end of the command (an error, kill -9) closes the pipe
    without that word, and the guard then takes the flock and, if the token is still its own,
    thaws the guest (retrying while QEMU lives, up to GUARD_WAIT s) and clears it;
  - the next locked command's recovery (core/vm/recovery.py) thaws a token left behind too, in
    case the guard itself was killed.

The agent serves one client at a time: the freeze and the thaw each use a connection of their
own, so between them (failpoint `bsnapshot:frozen`) anyone may ask the agent its status.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cbsd import debug
from cbsd.core.vm.machine import VM
from cbsd.detach import start_detached
from cbsd.errors import CbsdError, QemuError
from cbsd.failpoints import failpoint
from cbsd.qemu.agent import Agent

FROZEN = "fsfrozen"
THAWED = b"thawed"
# guest-fsfreeze-freeze flushes the guest's dirty data first: seconds on a busy guest.
FREEZE_TIMEOUT = 60.0
THAW_TIMEOUT = 10.0
# How long the guard keeps trying to thaw a guest whose agent does not answer (QEMU alive).
GUARD_WAIT = 300.0
# How long a freeze file's flock is waited for: its holders hold it for a freeze's instant.
FLOCK_WAIT = 120.0


def _flock(fd: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _token(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip()


def _set_token(fd: int, token: str) -> None:
    os.ftruncate(fd, 0)
    if token:
        os.pwrite(fd, token.encode(), 0)


def thaw(sock: str, timeout: float = THAW_TIMEOUT) -> None:
    """guest-fsfreeze-thaw over a connection of its own (harmless on a thawed guest)."""
    agent = Agent(sock, timeout=timeout)
    try:
        agent.call("guest-fsfreeze-thaw")
    finally:
        agent.close()


def _qemu_gone(e: QemuError) -> bool:
    return isinstance(e.__cause__, FileNotFoundError | ConnectionRefusedError)


@dataclass
class Outcome:
    frozen: bool  # *take* ran while the guest's filesystems were frozen
    why_not: str = ""  # why the freeze failed (then *take* ran unfrozen)
    seconds: float = 0.0  # how long the guest stayed frozen
    thaw_error: str = ""  # the thaw failed: the guard goes on trying


def frozen_snapshot(vm: VM, take: Callable[[], None]) -> Outcome:
    """Freeze the guest's filesystems, run *take*, thaw. When the freeze fails, the guest is
    thawed all the same and *take* runs unfrozen (crash-consistent). Raises what *take*
    raises, after the thaw."""
    sock = vm.paths.qga_sock
    path = vm.ctx.workdir.system(vm.jname) / FROZEN
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if not _flock(fd, FLOCK_WAIT):
            raise CbsdError(f"{vm.jname}: the guest's freeze file {path} stays locked")
        _thaw_leftover(vm, fd, sock)
        token = os.urandom(8).hex()
        _set_token(fd, token)
        r, w = os.pipe()
        try:
            _start_guard(r, sock, path, token)
        except OSError as e:
            _set_token(fd, "")
            os.close(w)
            raise CbsdError(f"{vm.jname}: cannot start the helper that guarantees the guest's "
                            f"thaw ({e.strerror or e}); nothing was frozen") from e
        finally:
            os.close(r)
        out = Outcome(frozen=False)
        started = time.monotonic()
        sent = False
        try:
            sent, out.why_not = _freeze(sock)
            out.frozen = not out.why_not
            if out.frozen:
                failpoint("bsnapshot:frozen")
            take()  # unfrozen if the freeze failed: crash-consistent (thawed below all the same)
        finally:
            # A freeze that reached the agent is thawed even if it failed: it may have frozen
            # some filesystems, or land late.
            out.thaw_error = _end_freeze(fd, w, sock if sent else None)
            out.seconds = time.monotonic() - started
        return out
    finally:
        os.close(fd)  # releases the flock


def _freeze(sock: str) -> tuple[bool, str]:
    """Freeze. -> (whether the request reached the agent, '' once frozen or why not)."""
    try:
        agent = Agent(sock, timeout=FREEZE_TIMEOUT)
    except QemuError as e:
        return False, str(e)
    try:
        agent.call("guest-fsfreeze-freeze")
        return True, ""
    except QemuError as e:
        return True, str(e)
    finally:
        agent.close()


def _end_freeze(fd: int, w: int, sock: str | None) -> str:
    """Thaw (*sock*: None when no freeze request was sent) and clear the token, then tell the
    guard; '' or why the thaw failed. If it failed, the token stays and the guard (which sees
    the pipe close without THAWED) keeps trying."""
    try:
        if sock is not None:
            thaw(sock)
    except QemuError as e:
        if not _qemu_gone(e):
            os.close(w)
            return f"{e}; a helper keeps trying for {GUARD_WAIT:g} s"
    _set_token(fd, "")
    with contextlib.suppress(OSError):  # the guard is gone: it had nothing to do
        os.write(w, THAWED)
    os.close(w)
    return ""


def _thaw_leftover(vm: VM, fd: int, sock: str) -> None:
    """A token left by a command that died frozen (flock held): thaw and clear it."""
    if not _token(fd):
        return
    if debug.ON:
        debug.log("recover", f"{vm.jname}: thawing the guest a dead command froze")
    if vm.alive():
        try:
            thaw(sock)
        except QemuError as e:
            if not _qemu_gone(e):
                raise CbsdError(f"{vm.jname}: the guest was left frozen by an interrupted "
                                f"snapshot and does not answer its thaw ({e})") from e
    _set_token(fd, "")


def recover(vm: VM) -> None:
    """Recovery's part: thaw a guest a dead command left frozen (its guard may be gone too)."""
    path = vm.ctx.workdir.system(vm.jname) / FROZEN
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if _token(fd) and _flock(fd, FLOCK_WAIT):
            _thaw_leftover(vm, fd, vm.paths.qga_sock)
    finally:
        os.close(fd)


def _start_guard(r: int, sock: str, path: Path, token: str) -> None:
    src = str(Path(__file__).resolve().parents[3])
    argv = [sys.executable, "-I", "-c",
            f"import sys; sys.path.insert(0, {src!r}); from cbsd.core.vm.fsfreeze import main; "
            "sys.exit(main(sys.argv[1:]))", str(r), sock, str(path), token]
    if debug.ON:
        debug.log("proc", " ".join(argv) + " &")
    start_detached(argv, pass_fds=(r,))


def guard(r: int, sock: str, path: Path, token: str) -> int:
    """The guard's work: wait for the command's end; unless it said THAWED, thaw the guest if
    the freeze file still holds *token*."""
    got = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(r, 64):
            got += chunk
    if got == THAWED:
        return 0
    deadline = time.monotonic() + GUARD_WAIT
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        if not _flock(fd, GUARD_WAIT) or _token(fd) != token:
            return 0  # another command's freeze now, or already thawed by recovery
        while True:
            try:
                thaw(str(sock))
                break
            except QemuError as e:
                if _qemu_gone(e):
                    break
                if time.monotonic() >= deadline:
                    return 1
                time.sleep(0.2)
        _set_token(fd, "")
        return 0
    finally:
        os.close(fd)


def main(args: list[str]) -> int:
    try:
        return guard(int(args[0]), args[1], Path(args[2]), args[3])
    except (OSError, CbsdError):
        return 1

