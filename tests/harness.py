"""The integration harness: the cbsd CLI as a user runs it (`Cbsd`, its `Result`), a command
stopped at a failpoint (`Stopped`), a guest's serial console (`Console`), the test guests' output
formats, /proc probes, and the file systems tests mount. Fixtures that use it are in conftest.py;
test modules import from here (a conftest is pytest's, not a module to import from). What tests
judge a VM by (checkpoints, the counter guest's lines) is tests/vmchecks.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    code: int
    out: str
    err: str

    def ok(self) -> Result:
        assert self.code == 0, f"exit {self.code}\nstdout: {self.out}\nstderr: {self.err}"
        return self

    def fails(self, code: int, grep: str) -> Result:
        """Failed with exit *code* and one line on stderr that says *grep* (as virtinst's
        add_invalid: a failure case must say why it failed, so it cannot pass for the
        wrong reason)."""
        assert self.code == code, f"exit {self.code}\nstdout: {self.out}\nstderr: {self.err}"
        assert grep in self.err, f"{grep!r} not in: {self.err}"
        assert self.err.count("\n") == 1 and "Traceback" not in self.err, self.err
        return self


class Cbsd:
    """Runs `python -m cbsd ...` in a subprocess with CBSD_WORKDIR set: the real CLI."""

    def __init__(self, workdir: Path, prefix: list[str] | None = None) -> None:
        self.workdir = workdir
        self.env = {**os.environ, "CBSD_WORKDIR": str(workdir)}
        # e.g. ["ip", "netns", "exec", NS]: cbsd, and the QEMUs it starts, run inside NS
        self.prefix = prefix or []

    def __call__(self, *args: str, timeout: float = 120) -> Result:
        p = subprocess.run([*self.prefix, sys.executable, "-m", "cbsd", *args],
                           capture_output=True, text=True, env=self.env, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        return Result(p.returncode, p.stdout, p.stderr)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*self.prefix, sys.executable, "-m", "cbsd", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, stdin=subprocess.DEVNULL)

    def at_failpoint(self, point: str, *args: str) -> Stopped:
        """Start a command that stops itself (SIGSTOP) at failpoint *point*; returns once it
        is stopped there, so the test can inject its fault at exactly that moment."""
        env = {**self.env, "CBSD_FAILPOINT": point}
        p = subprocess.Popen([sys.executable, "-m", "cbsd", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc_state(p.pid) != "T":
            if p.poll() is not None:
                raise AssertionError(f"never reached failpoint {point}: exit {p.returncode}, "
                                     f"{p.stderr.read().decode() if p.stderr else ''}")
            assert time.monotonic() < deadline, f"never reached failpoint {point}"
            time.sleep(0.01)
        return Stopped(p)

    def bls(self, jname: str | None = None) -> list[dict[str, object]]:
        args = ["bls", "format=json"] + ([f"jname={jname}"] if jname else [])
        return json.loads(self(*args).ok().out)

    def status(self, jname: str) -> str:
        return str(self.bls(jname)[0]["status"])

    def pid(self, jname: str) -> int:
        return int(self.bls(jname)[0]["jid"])  # type: ignore[arg-type]

    def system(self, jname: str) -> Path:
        return self.workdir / "jails-system" / jname

    def console(self, jname: str) -> Console:
        return Console(self.system(jname) / "console.log")

    def checkpoints(self, jname: str) -> list[dict[str, object]]:
        return json.loads(self("bcheckpoint", "mode=list", f"jname={jname}", "format=json")
                          .ok().out)


class Stopped:
    """A cbsd process stopped at a failpoint."""

    def __init__(self, p: subprocess.Popen[bytes]) -> None:
        self.p = p

    def kill9(self) -> None:
        self.p.kill()
        self.p.wait(10)

    def resume(self, sig: int | None = None, timeout: float = 120) -> Result:
        """Optionally deliver *sig* (it arrives when the process continues), then continue."""
        if sig is not None:
            os.kill(self.p.pid, sig)
        os.kill(self.p.pid, signal.SIGCONT)
        out, err = self.p.communicate(timeout=timeout)
        # The failpoint's own announcement is the harness's, not the command's output.
        lines = err.decode().splitlines(keepends=True)
        return Result(self.p.returncode, out.decode(),
                      "".join(ln for ln in lines if not ln.startswith("cbsd: failpoint ")))


class Console:
    """Reads what the guest wrote to its serial port (console.log), from a mark onwards."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        try:
            return self.path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        return len(self.text())

    def since(self, mark: int) -> str:
        return self.text()[mark:]

    def wait(self, pattern: str, since: int = 0, timeout: float = 30,
             count: int = 1) -> list[re.Match[str]]:
        """Wait until *pattern* matched *count* times after *since*; returns the matches."""
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.since(since)))
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                tail = self.since(since)[-600:]
                raise AssertionError(f"timed out waiting for {pattern!r} x{count}; "
                                     f"console since mark ends with:\n{tail}")
            time.sleep(0.05)


# Boot-sector guest lines: "n=12 disk=11 OK"
COUNTER_RE = r"n=(\d+) disk=(\d+) (OK|BAD)"


def counter_lines(text: str) -> list[tuple[int, int, str]]:
    """(count, count read back from the disk, OK|BAD) of each counter line in *text*."""
    return [(int(a), int(b), c) for a, b, c in re.findall(COUNTER_RE, text)]


def proc_alive(pid: int) -> bool:
    """A process that exists and is not a zombie (PID 1 here may reap late)."""
    return proc_state(pid) not in ("", "Z", "X")


def proc_state(pid: int) -> str:
    """The state letter /proc gives the process (R, S, T, Z, ...); "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def proc_cmdline(pid: int) -> bytes:
    """A process's argv, NUL-separated; b"" once it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


# CBSD_TEST_RAMFILE=1: every test's workdir lies on an XFS that clones files, so VMs keep
# their RAM in a file (vm_ramfile=auto) and the same tests check that engine too.
RAMFILE_MODE = os.environ.get("CBSD_TEST_RAMFILE") == "1"


@contextlib.contextmanager
def xfs_mount(mnt: Path, size: str = "24G") -> Iterator[Path]:
    """A loop-mounted XFS made with reflink=1 at *mnt* (a sparse image beside it)."""
    image = mnt.with_name(mnt.name + ".img")
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir(mode=0o700)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        with _unmounted_after(mnt):
            yield mnt
    finally:
        image.unlink()


def kill_vms(wd: Path, timeout: float = 30) -> None:
    """Whatever a test did, no QEMU outlives it: every QEMU whose command line names this
    test's workdir (whether or not the inventory recorded it) is killed, and this returns
    once none is left (a zombie counts as gone: it holds no file open), so what comes next --
    an unmount, the next test's QEMU on the same port -- never races a dying one."""
    killed_until_gone(lambda: qemu_processes(wd), "QEMU", timeout)


def killed_until_gone(find: Callable[[], list[int]], what: str, timeout: float = 30) -> None:
    """SIGKILL to every process *find* returns, until it returns none (or the deadline)."""
    deadline = time.monotonic() + timeout
    while alive := find():
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"{what} {alive} outlived SIGKILL for {timeout} s"
        time.sleep(0.02)


@contextlib.contextmanager
def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at *mnt* (full-disk and read-only tests); its QEMUs end with it."""
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                   check=True)
    with _unmounted_after(mnt):
        yield mnt


@contextlib.contextmanager
def _unmounted_after(mnt: Path) -> Iterator[None]:
    """Whatever happens inside: the QEMUs under *mnt* end, then it is unmounted."""
    try:
        yield
    finally:
        kill_vms(mnt)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def start_counter(cbsd: Cbsd, image: Path, jname: str = "vm1") -> str:
    """Define and boot a boot-sector VM from *image*; returns once it counts."""
    cbsd("bcreate", f"jname={jname}", f"image={image}", "vm_os_type=other", "vm_ram=32m").ok()
    cbsd("bstart", jname).ok()
    cbsd.console(jname).wait(COUNTER_RE, count=2)
    return jname


LINUX_CMDLINE = "console=ttyS0 loglevel=4 panic=-1"
TICK_RE = r"tick n=(\d+) up=([\d.]+) disk=(\d+) (OK|BAD)"


def create_linux(cbsd: Cbsd, guest: tuple[Path, Path], jname: str = "lx", *extra: str) -> str:
    """Define (not start) a VM that boots the Linux test guest (kernel, initrd); *extra*
    key=value pairs replace or add to its keys."""
    kernel, initrd = guest
    keys = {"kernel": str(kernel), "initrd": str(initrd), "cmdline": LINUX_CMDLINE,
            "vm_ram": "256m", "imgsize": "16m"}
    keys.update(e.split("=", 1) for e in extra)  # type: ignore[arg-type]
    cbsd("bcreate", f"jname={jname}", *(f"{k}={v}" for k, v in keys.items())).ok()
    return jname


def qemu_processes(workdir: Path) -> list[int]:
    """The live (not zombie) QEMUs whose command line names *workdir*."""
    return [int(d) for d in os.listdir("/proc") if d.isdigit()
            and b"qemu-system" in (cmd := proc_cmdline(int(d))) and str(workdir).encode() in cmd
            and proc_alive(int(d))]

