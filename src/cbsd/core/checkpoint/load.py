"""Loading a saved state into a stopped VM: restore a checkpoint, resume a hibernation.

Everything that can be checked is checked before QEMU is launched (manifest seal,
compatibility with this VM and host, file sizes, disk snapshots); the memory file's checksum
is verified on a second thread while QEMU starts. A state whose RAM is a file (core/vm/ramfile.py)
has that file cloned into place before QEMU starts; its size is checked, its checksum only by
`bcheckpoint mode=verify` (reading it all would make a restore as slow as RAM is large).
Disks are reverted only once the checksums matched: QEMU waiting for an incoming migration
holds its disks inactive (no lock, nothing written, metadata re-read when they are activated
at the end of the load), so a damaged state still leaves the disks untouched. A stream
folded into the chunk store is checked while QEMU loads it: every chunk before QEMU gets it,
and the disks are reverted once all passed, while QEMU still waits for the last piece (one
pass over the state instead of a check and then a load). QEMU starts with
``-incoming defer -S``; the guest runs only once the load completed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cbsd import cancel
from cbsd.core.checkpoint import generation, identity
from cbsd.core.checkpoint.compat import newer_qemu
from cbsd.core.vm import guest_agent, ramfile
from cbsd.core.vm.machine import VM
from cbsd.core.vm.states import state_tags
from cbsd.errors import Cancelled, CheckpointError, QemuError
from cbsd.failpoints import failpoint
from cbsd.model import settings_part
from cbsd.qemu import img, migration
from cbsd.qemu.host import machine_known
from cbsd.qemu.qmp import Monitor, open_fd_for
from cbsd.qemu.runstate import MigrationStatus, RunState
from cbsd.storage import ckpstore
from cbsd.storage.chunkstore import RECIPE, Recipe, Store


def check_restorable(vm: VM, ckdir: Path) -> ckpstore.Manifest:
    """Everything that can be checked without launching QEMU or reading the files' data (their
    checksums are _Verifier's, on a second thread). CheckpointError if any fails."""
    if not ckdir.is_dir() or ckdir.is_symlink():
        raise CheckpointError(f"{vm.jname}: no checkpoint {ckpstore.state_name(ckdir)}")
    m = ckpstore.read_manifest(ckdir)
    host = vm.ctx.host
    why = incompatibility(m, vm.spec.restore_relevant(), host.accel, host.version,
                          lambda machine: machine_known(host, machine))
    if why:
        raise CheckpointError(f"{vm.jname}: {ckpstore.describe(ckdir)} {why}")
    try:
        check_intact(ckdir, m, disk_snapshots(vm), checksums=False)
    except CheckpointError as e:
        raise CheckpointError(f"{vm.jname}: {e}") from None
    return m


def incompatibility(m: ckpstore.Manifest, relevant: dict[str, object], accel: str,
                    version: str, machine_known: Callable[[str], bool]) -> str | None:
    """Why a saved state cannot be loaded into this VM on this host, or None (pure)."""
    saved = settings_part(m.restore_relevant)
    keys = [*relevant, *(k for k in saved if k not in relevant)]
    diffs = [_diff(k, saved.get(k), relevant.get(k)) for k in keys
             if saved.get(k) != relevant.get(k)]
    if diffs:
        return "is incompatible with the VM's configuration now: " + "; ".join(diffs)
    if m.accel != accel:
        return f"was taken under {m.accel}, this host runs {accel}: cannot restore"
    if newer_qemu(m.qemu_version, version):
        return (f"was saved by QEMU {m.qemu_version}, newer than this host's {version}: "
                "cannot restore")
    if not machine_known(m.machine):
        return f"needs machine type {m.machine}, which this QEMU {version} does not provide"
    return None


def _diff(key: str, saved: object, now: object) -> str:
    if key == "nic":  # the NICs' types in order (VMSpec.restore_relevant)
        return (f"its NICs were {saved} (nic_type in order), now {now}: attach or detach "
                "NICs to match (cbsd bhyve-nic)")
    return f"{key} was {saved!r}, now {now!r}"


def disk_snapshots(vm: VM) -> dict[str, set[str]]:
    """The internal snapshots each of the VM's images holds now (one qemu-img call each)."""
    return {image.name: set(img.snapshots(Path(image.path))) if Path(image.path).exists()
            else set() for image in vm.images()}


def check_intact(ckdir: Path, m: ckpstore.Manifest, present: dict[str, set[str]],
                 checksums: bool = True) -> None:
    """A saved state's own integrity: every disk snapshot it names is still in *present*
    (from disk_snapshots), every file matches its size (and checksum)."""
    for s in m.disk_snapshots:
        if s.tag not in present.get(s.disk, set()):
            raise CheckpointError(f"{ckpstore.describe(ckdir)} is damaged: disk snapshot "
                                  f"{s.tag} is missing from {s.disk}")
    (ckpstore.verify_files if checksums else ckpstore.check_files)(ckdir, m)


class _Verifier(threading.Thread):
    """Checksums a saved state's files on a second thread (the host's other core) while the
    rest is checked and QEMU starts. Its verdict counts only once check_restorable passed (it
    reads the manifest on its own). A plain thread: concurrent.futures imports logging."""

    def __init__(self, vm: VM, ckdir: Path) -> None:
        super().__init__(daemon=True, name="cbsd-verify")
        self._vm, self._ckdir = vm, ckdir
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            # A RAM file is checked by size here and in full by mode=verify: reading all of
            # it would make every restore as slow as the RAM is large (docs/reliability.md).
            # A folded stream's chunks are checked as they are fed to QEMU (_Feeder).
            ckpstore.verify_checksums(self._ckdir, ckpstore.read_manifest(self._ckdir),
                                      skip=frozenset({ckpstore.RAM}), chunks=False)
        except CheckpointError as e:
            self._error = CheckpointError(f"{self._vm.jname}: {e}")
        except BaseException as e:  # handed to the main thread, which raises it
            self._error = e

    def result(self) -> None:
        self.join()
        if self._error is not None:
            raise self._error


def load(vm: VM, ckdir: Path, *, paused: bool | None,
         before_run: Callable[[ckpstore.Manifest], None] | None = None,
         fork: bool = True) -> bool:
    """Restore a saved state into a stopped VM. The state itself is left in place.

    paused: leave the VM paused; None: as it was when saved. before_run: called once the
    state is loaded and before the guest runs (a resume retires its image there). fork: the
    guest may have run on from this state before, so it gets a new generation ID
    (core/checkpoint/generation.py); only the VM's own hibernation image is not. Returns
    whether the VM was left paused."""
    checksums = _Verifier(vm, ckdir)
    try:
        m = check_restorable(vm, ckdir)
        genid = generation.for_load(ckdir, m, fork=fork)
        mon = vm.launch(incoming=True, ram_file=ramfile.place(vm, ckdir, m),
                        generation=genid)
    finally:
        checksums.join()  # never leave a thread reading the files behind us
    if paused is None:
        paused = not m.was_running
    try:
        failpoint("load:launched")
        checksums.result()
        _load_memory(vm, mon, ckdir, m)
        failpoint("load:loaded")
        generation.check_loaded(vm, mon, m, genid)
        renew = identity.nics_to_renew(vm, m, fork=fork)
        if paused:
            migration.activate_disks(mon)  # QEMU 10 keeps them inactive until 'cont'
        if before_run is not None:
            before_run(m)
        slots = identity.unplug(vm, mon, renew) if not paused else {}
        if not paused:
            mon.cmd("cont")
        expected = RunState.PAUSED if paused else RunState.RUNNING
        if (state := mon.status()) != expected:
            raise QemuError(f"{vm.jname}: after loading the state QEMU reports '{state}', "
                            f"expected '{expected}'")
        if slots:
            identity.plug(vm, mon, slots)
        elif renew and paused:
            saved = identity.saved_macs(m)
            for i in renew:
                print(f"{vm.jname}: restored paused: the guest keeps the checkpoint's MAC "
                      f"address {saved[i]} for NIC {i + 1} (a restore that runs it gets "
                      f"{vm.spec.nics[i].nic_hwaddr})", file=sys.stderr)
        _tend_guest(vm, m, ckdir, identity.guest_script(m, fork=fork))
    except BaseException as e:
        died = not vm.alive()
        reason = _qemu_log_tail(vm)
        vm.kill()
        what = ckpstore.describe(ckdir)
        if died and not isinstance(e, KeyboardInterrupt | Cancelled | CheckpointError):
            raise QemuError(f"{vm.jname}: QEMU exited while loading the {what}"
                            f"{': ' + reason if reason else ''}; the VM is Off") from e
        if isinstance(e, QemuError) and reason:
            raise QemuError(f"{vm.jname}: loading the {what} failed: {reason}") from e
        raise
    return paused


def _revert_disks(vm: VM, m: ckpstore.Manifest) -> None:
    """Once the whole state is known good, and before QEMU finishes loading it (QEMU 7.2
    activates the disks at the end of the load)."""
    failpoint("load:verified")
    for image, tag in state_tags(vm, m):
        img.snapshot_apply(Path(image.path), tag)
    failpoint("load:reverted")


def _load_memory(vm: VM, mon: Monitor, ckdir: Path, m: ckpstore.Manifest) -> None:
    caps = migration.capabilities(mon)
    if m.ram_file and "x-ignore-shared" not in caps:
        raise CheckpointError(f"{vm.jname}: the {ckpstore.describe(ckdir)} keeps RAM in a "
                              "file, which this QEMU cannot load (no x-ignore-shared)")
    migration.set_capabilities(mon, caps, {"x-ignore-shared": m.ram_file})
    needed = set(m.migration.get("capabilities") or ())
    if not needed <= caps:
        raise CheckpointError(f"{vm.jname}: the {ckpstore.describe(ckdir)} was saved with "
                              f"QEMU's {', '.join(sorted(needed - caps))}, which this QEMU "
                              "lacks")
    mapped = set(migration.MAPPED_RAM) <= needed
    migration.use_mapped_ram(mon, caps, mapped)
    if m.folded:
        _load_from_store(vm, mon, ckdir, m)
        return
    _revert_disks(vm, m)
    fd = open_fd_for(ckdir / ckpstore.MEMORY, write=False)
    direct = None
    try:
        if mapped and migration.direct_io_usable(mon, ckdir / ckpstore.MEMORY):
            direct = migration.open_direct(ckdir / ckpstore.MEMORY, write=False)
        if mapped:
            migration.use_direct_io(mon, direct is not None)
        channel = migration.attach(mon, fd, "cbsd-load", caps, direct)
        mon.cmd("migrate-incoming", uri=channel.uri)
        # QEMU's copy of fd shares its file offset with ours: the load is followed by it
        # (mapped-ram reads at offsets, leaving it alone: then QMP is asked from the start).
        _wait_incoming(vm, mon, (lambda: m.memory_size) if mapped
                       else lambda: os.lseek(fd, 0, os.SEEK_CUR), m.memory_size)
        migration.detach(mon, channel)
    finally:
        os.close(fd)
        if direct is not None:
            os.close(direct)


class _Feeder(threading.Thread):
    """Writes a stream folded into the chunk store into the pipe QEMU loads from, checking
    every chunk before QEMU gets it; the last piece waits for release() (see Store.feed)."""

    def __init__(self, ckdir: Path, out: int, size: int) -> None:
        super().__init__(daemon=True, name="cbsd-feed")
        self._ckdir, self._out, self._size = ckdir, out, size
        self.sent = [0]
        self.error: BaseException | None = None
        self.checked = threading.Event()  # every chunk checked, or the feed ended
        self._go, self._aborted = threading.Event(), False

    def run(self) -> None:
        try:
            Store(ckpstore.store_of(self._ckdir)).feed(
                Recipe.read(self._ckdir / RECIPE), self._size, self._out, self.sent,
                self._hold)
        except BaseException as e:  # a damaged chunk, QEMU gone (EPIPE), or aborted
            self.error = e
        finally:
            os.close(self._out)
            self.checked.set()

    def _hold(self) -> None:
        self.checked.set()
        self._go.wait()
        if self._aborted:
            raise Cancelled("the load was abandoned")

    def wait_checked(self, vm: VM) -> None:
        while not self.checked.wait(0.05):
            cancel.check()
        if isinstance(self.error, CheckpointError):
            raise CheckpointError(f"{vm.jname}: {ckpstore.describe(self._ckdir)} is damaged: "
                                  f"{self.error}")
        if self.error is not None:
            raise QemuError(f"{vm.jname}: feeding the state to QEMU failed: {self.error}")

    def release(self, *, abort: bool = False) -> None:
        self._aborted = abort
        self._go.set()


PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: fewer wake-ups of QEMU and the feeder (Linux's max default)


def _load_from_store(vm: VM, mon: Monitor, ckdir: Path, m: ckpstore.Manifest) -> None:
    """Through a pipe (fd:, which QEMU 10 does not deprecate for pipes). QEMU loads while
    the feeder checks the chunks, so a restore costs one pass over the state instead of a
    check and then a load; the disks are reverted once every chunk passed, while QEMU still
    waits for the last piece."""
    assert m.stream is not None
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    feeder = _Feeder(ckdir, w, m.stream.size)
    try:
        mon.send_fd(r, "cbsd-load")
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    feeder.start()
    try:
        mon.cmd("migrate-incoming", uri="fd:cbsd-load")
        feeder.wait_checked(vm)
        _revert_disks(vm, m)
    except BaseException:
        feeder.release(abort=True)
        raise
    feeder.release()
    _wait_incoming(vm, mon, lambda: feeder.sent[0], m.memory_size)
    feeder.join(10)
    if feeder.error is not None:
        raise QemuError(f"{vm.jname}: feeding the state to QEMU failed: {feeder.error}")


AGENT_WAIT = 120.0  # seconds the helper waits for the agent of a restored or resumed guest


def _tend_guest(vm: VM, m: ckpstore.Manifest, ckdir: Path, script: str | None) -> None:
    """After a restore or resume the guest's clock is behind by the state's age, and a clone's
    guest still has the original's machine-id and host keys (*script* renews them). With an
    agent (one listened when the state was saved) a detached helper sets the clock from the
    host's and runs *script* once the agent answers (a paused guest's agent answers once it
    runs); without one, say what is left undone."""
    if vm.spec.guest_agent and (m.agent or script):
        guest_agent.tend(vm, settime=m.agent, seconds=AGENT_WAIT, script=script)
    if vm.spec.guest_agent and not m.agent:
        behind = max(0, int(time.time() - m.created_ts))
        print(f"{vm.jname}: no guest agent answered when the {ckpstore.describe(ckdir)} was "
              f"saved: the guest's clock is about {behind} s behind; install "
              "qemu-guest-agent in the guest, or set the clock there (e.g. 'systemctl "
              "restart chrony')", file=sys.stderr)
    if script and not (vm.spec.guest_agent and m.agent):
        print(f"{vm.jname}: no guest agent answered when the {ckpstore.describe(ckdir)} was "
              f"saved: the guest keeps {m.migration.get(identity.CLONE_OF)}'s machine-id and "
              "SSH host keys until cloud-init renews them at its next boot (or renew them "
              "there yourself: docs/checkpoints.md)", file=sys.stderr)


# Following the load through the file offset: QEMU reads its first bytes within milliseconds
# of migrate-incoming; if the offset shows nothing for FOLLOW_START (a QEMU that reads with
# pread) or stops moving for FOLLOW_STALL (stuck), ask QMP instead, which answers between
# stretches of the load (or times out).
FOLLOW_START = 1.0
FOLLOW_STALL = 30.0


def _wait_incoming(vm: VM, mon: Monitor, position: Callable[[], int], size: int) -> None:
    """Until QEMU has loaded the state. While it loads, QEMU answers QMP only now and then
    (the load runs in its main loop, and reading a file never makes it wait; see
    docs/reliability.md for what was measured), so a QMP query can outlast any timeout, and
    polling would compete with the load. Instead follow the load through *position* (how
    far QEMU has read) and ask QMP only once QEMU has read everything. A `cont` must wait
    for that too: one sent during the load is lost."""
    exited = f"{vm.jname}: QEMU exited while loading the state"
    delay, last = 0.002, 0
    moved = time.monotonic()
    while (pos := position()) < size:
        if not vm.alive():
            raise QemuError(exited)
        if pos != last:
            last, moved = pos, time.monotonic()
        elif time.monotonic() - moved > (FOLLOW_STALL if last else FOLLOW_START):
            break
        cancel.check()
        time.sleep(delay)
        delay = min(delay * 2, 0.005)
    while True:
        try:
            state = mon.status()
        except QemuError:
            if not vm.alive():
                raise QemuError(exited) from None
            raise
        if state != RunState.INMIGRATE:
            break
        cancel.check()
        time.sleep(0.002)
    info = mon.cmd("query-migrate")
    if info.get("status") not in (None, MigrationStatus.COMPLETED):
        raise QemuError(f"{vm.jname}: loading the state failed: "
                        f"{info.get('error-desc', info.get('status'))}")


def _qemu_log_tail(vm: VM) -> str:
    try:
        lines = Path(vm.paths.qemu_log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines[-20:]):
        if "migration" in line.lower() or "error" in line.lower() or "mismatch" in line.lower():
            return line.split(": ", 1)[-1].strip()
    return ""
