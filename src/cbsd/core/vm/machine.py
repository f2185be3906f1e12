"""One VM at run time: its QEMU process, its monitor, and its status derived from reality.

Which QEMU is this VM's: the live process whose command line carries the VM's QMP socket path.
The inventory records its pid when cbsd starts it, but that record is only a hint: QEMU's own
pid file (written as it starts) is read when the hint is stale, and recovery scans every
process after a command died (core/vm/recovery.py), so a QEMU is never lost because the command
that launched it was killed before it could record it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cbsd import debug
from cbsd.core.vm.lock import is_held
from cbsd.errors import EnvironmentFault, QemuError, StateError, UsageError
from cbsd.failpoints import failpoint
from cbsd.model import Status, VMSpec
from cbsd.qemu import img, network, process
from cbsd.qemu.argv import (
    AS_DEFINED,
    EFI_VARS_NODE,
    GENID_OPTION,
    RAM_FILE_OPTION,
    RuntimePaths,
    build_argv,
    disk_node,
)
from cbsd.qemu.network import tap_name
from cbsd.qemu.qmp import Monitor
from cbsd.qemu.runstate import RunState
from cbsd.storage.ckpstore import has_manifest

if TYPE_CHECKING:
    from cbsd.core.vm.site import Site

# Without the VM's lock (bls, status), a monitor that does not answer within this is reported
# as such instead of holding up the listing; QEMU answers in about a millisecond.
PROBE_TIMEOUT = 1.0
# 'quit' gets this long before a power-off falls back to SIGKILL (a wedged QEMU never answers).
QUIT_TIMEOUT = 3.0


class Image(NamedTuple):
    """A qcow2 image of the VM that checkpoints snapshot: a disk, or the UEFI variable store."""

    name: str  # its file name under vm/<jname>/ (what manifests record)
    node: str  # QEMU's block node name
    path: str


EFI_VARS = "efivars.qcow2"


class VM:
    def __init__(self, ctx: Site, spec: VMSpec,
                 runtime: tuple[int, int] | None = None) -> None:
        self.ctx = ctx
        self.spec = spec
        self.jname = spec.jname
        self.pid, self.vnc_port = runtime or ctx.inventory.runtime(self.jname)
        self.recorded_pid = self.pid  # what the inventory says (self.pid may be found later)
        self._mon: Monitor | None = None
        self.unresponsive = ""  # why the monitor did not answer a status probe
        self.died = ""  # VMLock.died of the lock this command holds on the VM

    @functools.cached_property
    def paths(self) -> RuntimePaths:
        """Every runtime file's path. Computed on first use: a status look needs three
        paths (the lock, the pidfile, the hibernation image), not a dozen -- bls and the
        API's list derive the status of every VM at each call."""
        wd = self.ctx.workdir
        return RuntimePaths(
            disks=tuple(str(wd.disk(self.jname, d)) for d in self.spec.disks),
            qmp_sock=str(wd.qmp_sock(self.jname)),
            console_sock=str(wd.console_sock(self.jname)),
            console_log=str(wd.console_log(self.jname)),
            pidfile=str(wd.pidfile(self.jname)),
            qemu_log=str(wd.qemu_log(self.jname)),
            qga_sock=str(wd.qga_sock(self.jname)),
            seed=str(wd.seed(self.jname)),
            efi_vars=str(wd.disk(self.jname, EFI_VARS)) if self.spec.efi == "uefi" else "",
            taps=tuple(tap_name(wd.root, self.jname, i) if n.nic_type == "bridge" else ""
                       for i, n in enumerate(self.spec.nics)),
            ifup=str(wd.system(self.jname) / "ifup") if self.bridged() else "",
        )

    def bridged(self) -> list[tuple[int, str]]:
        """(index, bridge) of each NIC on a bridge ("": cbsd0)."""
        return [(i, n.nic_parent) for i, n in enumerate(self.spec.nics)
                if n.nic_type == "bridge"]

    @classmethod
    def load(cls, ctx: Site, jname: str) -> VM:
        return cls(ctx, ctx.spec(jname))

    def images(self) -> list[Image]:
        """Every image a checkpoint snapshots, in a fixed order: the disks, then the UEFI
        variable store (its contents change with the guest's boot settings)."""
        paths = [*self.paths.disks, *([self.paths.efi_vars] if self.paths.efi_vars else [])]
        return [Image(name, node, path)
                for (name, node), path in zip(self.image_nodes(self.spec), paths, strict=True)]

    @staticmethod
    def image_nodes(spec: VMSpec) -> list[tuple[str, str]]:
        """(file name under vm/<jname>/, QEMU block node name) of each of images(), for a
        definition that has no VM here yet (bmigrate's node half checks its request)."""
        out = [(name, disk_node(i)) for i, name in enumerate(spec.disks)]
        if spec.efi == "uefi":
            out.append((EFI_VARS, EFI_VARS_NODE))
        return out

    # --- process --------------------------------------------------------------------------

    def alive(self) -> bool:
        if self.pid and process.alive(self.pid, self.paths.qmp_sock):
            return True
        # Not self.paths.pidfile: a VM that is off needs no other path (see paths).
        pid = process.read_pidfile(str(self.ctx.workdir.pidfile(self.jname)))
        if pid and pid != self.pid and process.alive(pid, self.paths.qmp_sock):
            self.pid = pid  # a launch whose pid never reached the inventory
            return True
        return False

    def adopt(self) -> None:
        """Record a QEMU found running (lock held): its pid and VNC port, its files tightened."""
        self._owner_only()
        if self.spec.vnc:
            with contextlib.suppress(QemuError):
                self.vnc_port = int(self.monitor(timeout=PROBE_TIMEOUT).cmd("query-vnc")
                                    .get("service", 0))
            self.close()  # the command's own session gets the normal timeouts
        self._record(self.pid, self.vnc_port)

    def probe_state(self) -> RunState | None:
        """QEMU's run state if it answers within PROBE_TIMEOUT, else None (no QEMU, or one
        that does not answer)."""
        if not self.alive():
            return None
        try:
            return RunState.parse(self.monitor(timeout=PROBE_TIMEOUT).status())
        except QemuError:
            return None
        finally:
            self.close()

    def monitor(self, timeout: float | None = None) -> Monitor:
        """The VM's QMP session, opened once and shared by everything this command does (a
        session costs a connect and a capabilities negotiation)."""
        if self._mon is None or self._mon.closed:
            self._mon = (Monitor(Path(self.paths.qmp_sock), self.jname) if timeout is None
                         else Monitor(Path(self.paths.qmp_sock), self.jname, timeout=timeout,
                                      connect_timeout=timeout))
        return self._mon

    def close(self) -> None:
        """Close the VM's session (done when the VM's lock is released, or its QEMU ends)."""
        if self._mon is not None:
            self._mon.close()
            self._mon = None

    def argv(self, *, incoming: bool = False, paused: bool = False,
             ram_file: bool = False, generation: str | None = AS_DEFINED) -> list[str]:
        host = self.ctx.host
        paths = self.paths
        if paths.efi_vars:
            code = host.ovmf_code_for(qcow2_virtual_size(paths.efi_vars))
            if code is None:
                raise QemuError(f"{self.jname}: no UEFI firmware on this host matches its "
                                "variable store: apt-get install ovmf")
            paths = dataclasses.replace(paths, efi_code=code)
        if ram_file:
            paths = dataclasses.replace(paths, ram_file=str(self.ram_path))
        return build_argv(self.spec, host, paths, incoming=incoming, start_paused=paused,
                          generation=generation)

    @property
    def ram_path(self) -> Path:
        return self.ctx.workdir.ram_file(self.jname)

    def uses_ram_file(self) -> bool:
        """Whether the running QEMU keeps guest RAM in the VM's RAM file (asked of the process,
        not of the settings, which may have changed since it started)."""
        return RAM_FILE_OPTION in process.cmdline(self.pid)

    def uses_genid(self) -> bool:
        """Whether the running QEMU has the vmgenid device (asked of the process: a QEMU
        started before vm_genid existed, or before a bset, has what it started with)."""
        return GENID_OPTION in process.cmdline(self.pid)

    def launch(self, *, ram_file: bool, incoming: bool = False,
               paused: bool = False, generation: str | None = AS_DEFINED) -> Monitor:
        """Start QEMU and return a monitor session. Kills QEMU again if set-up fails.
        *ram_file*: guest RAM in the VM's RAM file, which is in place (core/vm/ramfile.py:
        fresh() or place() put it there; a failed launch removes it). *generation*: the
        vmgenid device's guid (qemu/argv.py build_argv); a load passes the state's."""
        self.ctx.workdir.ensure_vm(self.jname)
        try:
            self.check_images()  # QEMU runs as root: no image may make it open another file
            if self.bridged():
                self._prepare_bridges()
            for sock in (self.paths.qmp_sock, self.paths.console_sock, self.paths.qga_sock):
                Path(sock).unlink(missing_ok=True)
            self.pid = process.launch(self.argv(incoming=incoming, paused=paused,
                                                ram_file=ram_file, generation=generation),
                                      Path(self.paths.pidfile), Path(self.paths.qemu_log))
            failpoint("launch:started")
            try:
                self._owner_only()
                self.close()  # a session to an earlier QEMU of this VM is dead
                mon = self.monitor()
                if self.spec.vnc and self.spec.vnc_password:
                    mon.cmd("set_password", protocol="vnc", password=self.spec.vnc_password)
                self.vnc_port = int(mon.cmd("query-vnc").get("service", 0)) \
                    if self.spec.vnc else 0
            except BaseException:
                self.kill()
                raise
        except BaseException:
            # The RAM file (new, or a restore's clone placed before the launch) is not held
            # by a VM that is Off: a refused or failed launch leaves none behind.
            if not self.alive():
                self.ram_path.unlink(missing_ok=True)
            raise
        self._record(self.pid, self.vnc_port)
        return mon

    def check_images(self) -> None:
        """Every image of the VM (its disks, its UEFI variable store) is a qcow2 whose header
        names no other file: before every launch and clone (the header only: no qemu-img)."""
        for image in self.images():
            try:
                img.check_header(Path(image.path), f"{self.jname}: {image.name}")
            except UsageError as e:
                raise StateError(str(e)) from None

    def _prepare_bridges(self) -> None:
        """The bridges the taps go on: the ones named, or cbsd0 (brought up on first use)."""
        wd = self.ctx.workdir
        bridged = self.bridged()
        for i, parent in bridged:
            key = "interface" if i == 0 else f"NIC {i + 1}: nic_parent"
            if parent and not network.bridge_exists(parent):
                raise QemuError(f"{self.jname}: {key}={parent}: no such bridge on this host "
                                f"(create it, e.g. 'ip link add {parent} type bridge', or "
                                "leave it empty for cbsd's own network cbsd0)")
        if any(not parent for _, parent in bridged):
            with self.ctx.lock(f"net-{network.MANAGED}", "network set-up", wait=30, vm=False):
                network.ensure_managed(wd.run_dir, wd.inventory.parent)
        network.write_ifup(Path(self.paths.ifup), {self.paths.taps[i]: parent or network.MANAGED
                                                   for i, parent in bridged})

    def _record(self, pid: int, vnc_port: int) -> None:
        """Note the pid in the inventory. Only a hint (see the module's docstring), so a full
        disk that refuses the write must not fail the command that started or ended QEMU."""
        try:
            self.ctx.inventory.set_runtime(self.jname, pid, vnc_port)
            self.recorded_pid = pid
        except (sqlite3.OperationalError, EnvironmentFault) as e:
            if debug.ON:
                debug.log("inventory", f"{self.jname}: pid not recorded: {e}")

    def _owner_only(self) -> None:
        """QEMU's -daemonize sets its umask to 027, so its sockets and logs come out group-
        readable. The 0700 directory already shuts others out; tighten the files too."""
        for p in (self.paths.qmp_sock, self.paths.console_sock, self.paths.console_log,
                  self.paths.qemu_log, self.paths.pidfile, self.paths.qga_sock,
                  str(self.ram_path)):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(p, 0o600)

    def kill(self) -> None:
        """Power off hard, now, and wait for the process to go."""
        process.kill(self.pid, self.paths.qmp_sock, signal.SIGKILL)
        if not process.wait_gone(self.pid, self.paths.qmp_sock, 10):
            raise QemuError(f"{self.jname}: QEMU (pid {self.pid}) did not exit after SIGKILL")
        self.forget_process()

    def power_off(self) -> None:
        """Power off now, through QEMU's 'quit' so disk images are flushed; SIGKILL if QEMU
        does not answer or end within QUIT_TIMEOUT (a wedged or stopped QEMU)."""
        try:
            mon = self.monitor(timeout=QUIT_TIMEOUT)
            mon.timeout = QUIT_TIMEOUT
            mon.cmd("quit")
        except QemuError as e:
            if debug.ON:
                debug.log("proc", f"{self.jname}: quit failed ({e}): SIGKILL")
        if process.wait_gone(self.pid, self.paths.qmp_sock, QUIT_TIMEOUT):
            self.forget_process()
        else:
            self.kill()

    def forget_process(self) -> None:
        self.close()
        self.pid = 0
        self.vnc_port = 0
        self._record(0, 0)
        for p in (self.paths.qmp_sock, self.paths.console_sock, self.paths.pidfile,
                  self.paths.qga_sock, str(self.ctx.workdir.agent_state(self.jname)),
                  str(self.ctx.workdir.current_checkpoint(self.jname)), str(self.ram_path)):
            Path(p).unlink(missing_ok=True)

    # --- status ---------------------------------------------------------------------------

    def status(self, *, mine: bool = False, timeout: float = PROBE_TIMEOUT,
               also: Callable[[Monitor], None] | None = None) -> Status:
        """The truth right now. *mine*: the caller holds the VM's lock (not Maintenance then).
        Without it, a monitor silent for *timeout* s is noted in `unresponsive`; *also* is
        run in the same QMP session once the run state is known (the metrics' disk I/O)."""
        if not mine and is_held(self.ctx.workdir.lock_file(self.jname)):
            return Status.MAINTENANCE
        if self.alive():
            try:
                mon = self.monitor() if mine else self.monitor(timeout=timeout)
                running = mon.running()
                if also is not None:
                    also(mon)
                return Status.ON if running else Status.PAUSED
            except QemuError as e:
                # Alive but not answering (starting up, or wedged): it is not Off.
                self.unresponsive = str(e)
                return Status.ON if self.alive() else self._status_off()
            finally:
                if not mine:
                    # Without the VM's lock, never keep QMP: it serves one client at a time,
                    # and the command that takes the lock next needs it.
                    self.close()
        return self._status_off()

    def _status_off(self) -> Status:
        if has_manifest(self.ctx.workdir.hibernation(self.jname)):
            return Status.SUSPENDED
        return Status.OFF

    def rss_and_cpu(self) -> tuple[int, float]:
        """Resident MB of the QEMU process and its CPU percent (lifetime average, like ps)."""
        return process.resident_bytes(self.pid) >> 20, process.cpu_percent(self.pid)


def qcow2_virtual_size(qcow2: str) -> int:
    """A qcow2 image's virtual size from its header (bytes 24-31, big-endian): no qemu-img
    call, and it works while QEMU holds the image."""
    try:
        with open(qcow2, "rb") as f:
            header = f.read(32)
    except OSError:
        return 0
    return int.from_bytes(header[24:32], "big") if header[:4] == b"QFI\xfb" else 0


def adopt_lost_qemu(vm: VM, *, scan: bool) -> None:
    """A QEMU this VM's command line names but the inventory does not: a command killed after
    QEMU started and before it recorded the pid. Found through QEMU's pid file (VM.alive
    already looks there), or, after a command died, through every process's argv."""
    if not vm.alive() and scan:
        pid = process.find_by_marker(vm.paths.qmp_sock)
        if pid:
            vm.pid = pid
    if vm.pid and vm.pid != vm.recorded_pid and vm.alive():
        if debug.ON:
            debug.log("recover", f"{vm.jname}: adopting QEMU pid {vm.pid} "
                      f"(recorded {vm.recorded_pid})")
        vm.adopt()
