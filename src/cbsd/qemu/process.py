"""Launching QEMU and telling whether it still lives.

QEMU runs with -daemonize, so it outlives the cbsd command that started it. Here PID 1 may reap
orphans late (FACTS.md): an exited QEMU lingers as a zombie and kill(pid, 0) still succeeds, so
liveness reads /proc/PID/stat. The pid is also checked against the VM's QMP socket path in the
process's command line, so a recycled pid is never taken for the VM.

Imports stay light (subprocess, signal, contextlib in the functions that use them): bpause's
quick lane (cbsd/cli/quick.py) uses alive() and must not pay for them.
"""

from __future__ import annotations

import contextlib
import os
import time

from cbsd import cancel, debug
from cbsd.errors import QemuError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path


def alive(pid: int, marker: str) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2:][:1]
    return state not in (b"Z", b"X") and marker.encode() in cmdline


def cmdline(pid: int) -> bytes:
    """A process's argv, NUL-separated (b"" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def read_pidfile(path: str) -> int:
    """The pid QEMU wrote into its -pidfile (0 if none): QEMU writes it as it starts, before
    cbsd records anything, so it survives a cbsd killed during the launch."""
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def find_by_marker(marker: str) -> int:
    """The pid of a live process whose command line contains *marker* (a VM's QMP socket
    path), 0 if none: reads every process's argv, so only used after a command died."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and alive(int(entry), marker):
            return int(entry)
    return 0


def open_files(pid: int) -> set[tuple[int, int]] | None:
    """(st_dev, st_ino) of every file the process has open; None if /proc does not say."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    held = set()
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        held.add((st.st_dev, st.st_ino))
    return held


def resident_bytes(pid: int) -> int:
    """The process's resident memory, from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def cpu_percent(pid: int) -> float:
    """CPU use over the process's lifetime, as ps shows it (utime+stime over elapsed time),
    from /proc/PID/stat (fields 14, 15 and 22) and the system's uptime."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    hz = os.sysconf("SC_CLK_TCK")
    used = (int(fields[11]) + int(fields[12])) / hz  # fields 14, 15 (after pid and comm)
    elapsed = max(1e-3, uptime - int(fields[19]) / hz)  # field 22: start time
    return round(100.0 * used / elapsed, 1)


def launch(argv: list[str], pidfile: Path, qemu_log: Path) -> int:
    """Run QEMU (-daemonize: returns once the VM is set up). Returns the daemon's pid."""
    # lazy: only a launch; the pause lane imports this module and must stay light
    import subprocess

    pidfile.unlink(missing_ok=True)
    if debug.ON:
        debug.log("proc", " ".join(argv))
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, timeout=120, check=False)
    except subprocess.TimeoutExpired as e:
        raise QemuError("QEMU did not finish starting within 120 s") from e
    if debug.ON:
        debug.log("proc", f"-> exit {res.returncode}")
    if res.returncode != 0:
        raise QemuError(f"QEMU failed to start: {first_error(res.stderr, qemu_log)}")
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as e:
        raise QemuError(f"QEMU started but wrote no pid file {pidfile}") from e


def first_error(stderr: bytes, qemu_log: Path) -> str:
    text = stderr.decode(errors="replace")
    with contextlib.suppress(OSError):
        text += "\n" + qemu_log.read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # "qemu-system-x86_64: -blockdev ...: Could not open ..." -> keep the informative tail.
    for ln in lines:
        if "qemu-system" in ln or "error" in ln.lower():
            return ln.split(": ", 1)[-1] if ln.startswith("qemu-system") else ln
    return lines[0] if lines else "no message (see qemu.log)"


def kill(pid: int, marker: str, sig: int) -> None:
    if alive(pid, marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pid: int, marker: str, timeout: float, *, cancellable: bool = False) -> bool:
    """Whether QEMU *pid* ended within *timeout* s. *cancellable*: a cancel (cbsd.cancel)
    ends the wait with Cancelled -- only where nothing is being rolled back (bstop's ACPI
    wait), never in a power-off that a rollback itself runs."""
    deadline = time.monotonic() + timeout
    while alive(pid, marker):
        if time.monotonic() >= deadline:
            return False
        if cancellable:
            cancel.check()
        time.sleep(0.02)
    return True
