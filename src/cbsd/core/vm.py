"""One VM at run time: its QEMU process, its monitor, and its status derived from reality."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from cbsd.core.context import Context
from cbsd.core.lock import is_held
from cbsd.core.model import Status, VMSpec
from cbsd.errors import QemuError
from cbsd.qemu import process
from cbsd.qemu.argv import RuntimePaths, build_argv
from cbsd.qemu.qmp import Monitor


class VM:
    def __init__(self, ctx: Context, spec: VMSpec,
                 runtime: tuple[int, int] | None = None) -> None:
        self.ctx = ctx
        self.spec = spec
        self.jname = spec.jname
        wd = ctx.workdir
        self.paths = RuntimePaths(
            disks=tuple(str(wd.disk(self.jname, d)) for d in spec.disks),
            qmp_sock=str(wd.qmp_sock(self.jname)),
            console_sock=str(wd.console_sock(self.jname)),
            console_log=str(wd.console_log(self.jname)),
            pidfile=str(wd.pidfile(self.jname)),
            qemu_log=str(wd.qemu_log(self.jname)),
        )
        self.pid, self.vnc_port = runtime or ctx.inventory.runtime(self.jname)
        self._mon: Monitor | None = None

    @classmethod
    def load(cls, ctx: Context, jname: str) -> VM:
        return cls(ctx, ctx.spec(jname))

    # --- process --------------------------------------------------------------------------

    def alive(self) -> bool:
        return process.alive(self.pid, self.paths.qmp_sock)

    def monitor(self) -> Monitor:
        """The VM's QMP session, opened once and shared by everything this command does (a
        session costs a connect and a capabilities negotiation)."""
        if self._mon is None or self._mon.closed:
            self._mon = Monitor(Path(self.paths.qmp_sock), self.jname)
        return self._mon

    def close(self) -> None:
        """Close the VM's session (done when the VM's lock is released, or its QEMU ends)."""
        if self._mon is not None:
            self._mon.close()
            self._mon = None

    def argv(self, *, incoming: bool = False, paused: bool = False) -> list[str]:
        return build_argv(self.spec, self.ctx.host, self.paths, incoming=incoming,
                          start_paused=paused)

    def launch(self, *, incoming: bool = False, paused: bool = False) -> Monitor:
        """Start QEMU and return a monitor session. Kills QEMU again if set-up fails."""
        self.ctx.workdir.ensure_vm(self.jname)
        for sock in (self.paths.qmp_sock, self.paths.console_sock):
            Path(sock).unlink(missing_ok=True)
        self.pid = process.launch(self.argv(incoming=incoming, paused=paused),
                                  Path(self.paths.pidfile), Path(self.paths.qemu_log))
        try:
            self._owner_only()
            self.close()  # a session to an earlier QEMU of this VM is dead
            mon = self.monitor()
            if self.spec.vnc and self.spec.vnc_password:
                mon.cmd("set_password", protocol="vnc", password=self.spec.vnc_password)
            self.vnc_port = int(mon.cmd("query-vnc").get("service", 0)) if self.spec.vnc else 0
        except BaseException:
            self.kill()
            raise
        self.ctx.inventory.set_runtime(self.jname, self.pid, self.vnc_port)
        return mon

    def _owner_only(self) -> None:
        """QEMU's -daemonize sets its umask to 027, so its sockets and logs come out group-
        readable. The 0700 directory already shuts others out; tighten the files too."""
        for p in (self.paths.qmp_sock, self.paths.console_sock, self.paths.console_log,
                  self.paths.qemu_log, self.paths.pidfile):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(p, 0o600)

    def kill(self) -> None:
        """Power off hard, now, and wait for the process to go."""
        process.kill(self.pid, self.paths.qmp_sock, signal.SIGKILL)
        if not process.wait_gone(self.pid, self.paths.qmp_sock, 10):
            raise QemuError(f"{self.jname}: QEMU (pid {self.pid}) did not exit after SIGKILL")
        self.forget_process()

    def power_off(self) -> None:
        """Power off now, but through QEMU's 'quit' so disk images are flushed; SIGKILL if that
        does not end it."""
        with contextlib.suppress(QemuError):
            self.monitor().cmd("quit")
        if process.wait_gone(self.pid, self.paths.qmp_sock, 10):
            self.forget_process()
        else:
            self.kill()

    def forget_process(self) -> None:
        self.close()
        self.pid = 0
        self.vnc_port = 0
        self.ctx.inventory.set_runtime(self.jname, 0, 0)
        for p in (self.paths.qmp_sock, self.paths.console_sock, self.paths.pidfile):
            Path(p).unlink(missing_ok=True)

    # --- status ---------------------------------------------------------------------------

    def status(self, *, mine: bool = False) -> Status:
        """The truth right now. *mine*: the caller holds the VM's lock (not Maintenance then)."""
        if not mine and is_held(self.ctx.workdir.lock_file(self.jname)):
            return Status.MAINTENANCE
        if self.alive():
            try:
                return Status.ON if self.monitor().running() else Status.PAUSED
            except QemuError:
                # Alive but not answering (starting up, or wedged): it is not Off.
                return Status.ON if self.alive() else self._status_off()
            finally:
                if not mine:
                    # Without the VM's lock, never keep QMP: it serves one client at a time,
                    # and the command that takes the lock next needs it.
                    self.close()
        return self._status_off()

    def _status_off(self) -> Status:
        from cbsd.storage.ckpstore import is_complete

        if is_complete(self.ctx.workdir.hibernation(self.jname)):
            return Status.SUSPENDED
        return Status.OFF

    def rss_and_cpu(self) -> tuple[int, float]:
        """Resident MB of the QEMU process and its CPU percent (lifetime average, like ps)."""
        import psutil

        try:
            p = psutil.Process(self.pid)
            with p.oneshot():
                t = p.cpu_times()
                elapsed = max(1e-3, time.time() - p.create_time())
            rss = process.resident_bytes(self.pid) >> 20
            return rss, round(100.0 * (t.user + t.system) / elapsed, 1)
        except (psutil.Error, OSError):
            return 0, 0.0


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
