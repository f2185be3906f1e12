"""Saving a VM's complete state: the engine behind checkpoints and hibernation.

Save (VM On or Paused, lock held, recovery already run by Context.locked_vm):
  1. stop the vCPUs (also with live=1), so memory and disks are taken at one instant;
  2. an internal qcow2 snapshot of every disk (metadata only, a few ms);
  3. QEMU migrates RAM, CPU and device state into a file we opened (fd: or an fdset, by what
     QEMU offers), bandwidth uncapped, while a thread checksums the file as it grows (no
     second pass). A VM whose RAM is a file (core/vm/ramfile.py) writes its device state only,
     and its RAM file is cloned (reflink) into the state, then checksummed while it runs on;
  4. fsync, check the disks QEMU snapshotted are the VM's files, manifest, fsync, verify,
     rename into place; the VM is put back as it was.
Any failure or signal undoes 1-4: disk snapshots deleted, temporary files removed, VM resumed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbsd import cancel
from cbsd.core.checkpoint import generation, tree
from cbsd.core.checkpoint.save_stream import Follower
from cbsd.core.vm import ramfile
from cbsd.core.vm.machine import VM, Image
from cbsd.core.vm.pause import set_clock
from cbsd.core.vm.recovery import INTENT
from cbsd.core.vm.states import TAG_PREFIX, delete_tags, drop_state
from cbsd.errors import (
    CbsdError,
    CheckpointError,
    MigrationFailed,
    NoSpaceError,
    QemuError,
    QmpCommandError,
)
from cbsd.failpoints import failpoint
from cbsd.qemu import migration, process
from cbsd.qemu.qmp import Monitor, open_fd_for
from cbsd.qemu.runstate import ENDED, IN_PROGRESS, RunState
from cbsd.storage import ckpstore
from cbsd.storage.atomic import fsync_dir, fsync_path, os_error, remove_tree
from cbsd.storage.manifest import DiskSnapshot, FileEntry, Manifest, Timings
from cbsd.storage.paths import free_bytes

Progress = Callable[[int, int], None]
Stamp = Callable[[Manifest], None]  # the caller's marks on a manifest before it is sealed
# QMP transaction actions the caller adds to the disks' snapshots, given (image, tag) of each:
# taken in the same paused instant, all or none (replication's dirty bitmaps and backup jobs)
Along = Callable[[list[tuple[Image, str]]], list[dict[str, Any]]]
UNLIMITED_BANDWIDTH = 1 << 40
def put_back(mon: Monitor, was_running: bool) -> None:
    """Return the VM to the run state it had. After a completed migration QEMU 7.2 leaves it in
    'postmigrate' with its disks inactive; 'cont' reactivates them (probed, not assumed)."""
    # QEMU reports the migration completed (or failed) a moment before its migration thread
    # leaves 'finish-migrate' for 'postmigrate'; a 'cont' sent in between is undone by it.
    deadline = time.monotonic() + 10
    while (state := mon.status()) == RunState.FINISH_MIGRATE and time.monotonic() < deadline:
        time.sleep(0.001)
    if was_running:
        if state != RunState.RUNNING:
            mon.cmd("cont")
    elif state == RunState.POSTMIGRATE and not migration.activate_disks(mon):
        # QEMU 7.2 has no way to reactivate disks without running the vCPUs: the guest runs
        # for one QMP round trip (~0.5 ms). Sending 'stop' without awaiting 'cont' is no
        # way out: QEMU then asserts on a write to a still-inactive disk.
        mon.cmd("cont")
        mon.cmd("stop")


def _set_clock(vm: VM, mon: Monitor, stopped: float | None) -> str | None:
    """After put_back ran a guest this save had stopped: its clock stood still meanwhile
    (~0.4 s for a small guest, seconds for a large one written without live=1). Returns the
    agentless note, printed only once the save has succeeded."""
    if stopped is not None and mon.running():
        return set_clock(mon, vm.jname, str(vm.ctx.workdir.system(vm.jname)),
                         time.monotonic() - stopped)
    return None


@dataclass
class _Attempt:
    """What the phases of one save share (prepare, freeze, stream, seal and publish), and
    what a rollback must undo."""

    vm: VM
    mon: Monitor
    name: str
    kind: str
    live: bool  # live=1 asked for and the VM was running
    keep_running: bool
    caps: frozenset[str]
    ram_file: bool  # the guest's RAM is a file: the stream carries device state only
    tmp: Path  # the state being written (published to final once complete)
    was_running: bool
    agent: bool  # a guest agent was listening before the vCPUs stopped
    mapped: bool = False  # the stream is a mapped-ram file (see _freeze)
    direct_io: bool = False  # QEMU wrote the mapped-ram file with O_DIRECT
    tags: list[tuple[Image, str]] = field(default_factory=list)  # disk snapshots taken
    follower: Follower | None = None  # checksumming the memory file while QEMU writes it
    stopped: float | None = None  # when this save stopped the vCPUs (time.monotonic())
    clock_note: str | None = None  # printed once the save succeeded
    info: dict[str, Any] = field(default_factory=dict)  # QEMU's query-migrate at the end
    elapsed: float = 0.0  # seconds QEMU took to write the state
    began: float = 0.0  # when the save began (time.monotonic())
    migrating: float = 0.0  # when 'migrate' was sent (time.monotonic())
    resumed_by_qemu: bool = False  # live=1: background-snapshot ran the guest on meanwhile
    guest_gap: float = 0.0  # how long the vCPUs stood still for this save (Timings)
    files: dict[str, FileEntry] = field(default_factory=dict)
    stamp: Stamp | None = None
    along: Along | None = None


def save(vm: VM, final: Path, *, name: str, kind: str, live: bool = False,
         keep_running: bool = True, progress: Progress | None = None,
         stamp: Stamp | None = None, along: Along | None = None) -> Manifest:
    """Write the VM's complete state to *final* (replacing an older one only once complete).
    The caller holds the VM's lock, under which recovery already ran.

    keep_running=False leaves QEMU stopped after the save (the caller ends it). *stamp*
    adds the caller's marks to the manifest (a schedule's), sealed with the rest. *along*:
    QMP actions taken with the disks' snapshots, in one transaction (the caller undoes their
    effects if the save fails)."""
    a = _prepare(vm, final, name, kind, live, keep_running)
    a.stamp, a.along = stamp, along
    try:
        _freeze(a)
        _stream(a, progress)
        manifest, old = _seal_and_publish(a, final)
    except BaseException as e:
        if a.follower is not None:
            with contextlib.suppress(Exception):
                a.follower.abandon()
        _rollback(vm, a.mon, a.tmp, a.tags, a.was_running, wait_out=a.mapped)
        with contextlib.suppress(CbsdError, OSError):
            _set_clock(vm, a.mon, a.stopped)  # its note is not printed: the error is the line
        error = _save_error(vm, e, kind, name)
        if error is e:
            raise
        raise error from e
    failpoint("save:published")
    if old is not None:
        try:
            drop_state(vm, old)
        except CbsdError as e:
            raise CbsdError(f"{vm.jname}: the {kind} {name} was saved, but the one it replaced "
                            f"could not be deleted ({e}); the next command retries") from e
    if a.clock_note:
        print(a.clock_note, file=sys.stderr, flush=True)
    return manifest


def _prepare(vm: VM, final: Path, name: str, kind: str, live: bool,
             keep_running: bool) -> _Attempt:
    """What the save will be, refused early when it cannot fit; its temporary folder. Nothing
    to roll back if this fails."""
    began = time.monotonic()
    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mon = vm.monitor()
    caps = migration.capabilities(mon)
    # Guest RAM in a file: the stream carries device state only, RAM is cloned (metadata).
    ram_file = vm.uses_ram_file() and "x-ignore-shared" in caps
    if not ram_file:
        _check_space(vm, final.parent)
    elif keep_running:
        ramfile.admit_checkpoint(vm)
    tmp = ckpstore.new_tmpdir(final)
    was_running = mon.running()
    return _Attempt(vm=vm, mon=mon, name=name, kind=kind, live=live and was_running,
                    keep_running=keep_running, caps=caps, ram_file=ram_file, tmp=tmp,
                    was_running=was_running, began=began,
                    agent=vm.agent_listening())  # before the vCPUs stop: as saved


def _freeze(a: _Attempt) -> None:
    """QEMU set up for the save, the vCPUs stopped and every disk snapshotted: disks and
    memory of one instant."""
    vm, mon, caps = a.vm, a.mon, a.caps
    (a.tmp / INTENT).write_text("running" if a.was_running else "paused")
    # With a RAM file, live=1 needs no background snapshot: the guest stops only while its
    # device state is written and its RAM cloned.
    _set_migration(mon, caps, a.live and not a.ram_file)
    migration.set_capabilities(mon, caps, {"x-ignore-shared": a.ram_file})
    # Not for checkpoints that will be folded into the chunk store (a folded stream is
    # fed back through a pipe; mapped-ram loads only from a file). A mapped-ram save is
    # never cancelled, only waited out (see _end_migration).
    a.mapped = ((a.kind == "hibernation" or vm.spec.dedup == "off")
                and migration.mapped_ram_usable(caps, live=a.live, ram_file=a.ram_file))
    migration.use_mapped_ram(mon, caps, a.mapped)
    if a.ram_file and a.was_running:
        ramfile.flush(vm.ram_path)  # the clone waits for dirty pages: write them now
    # Disk and memory must be of the same instant: freeze first, even for live=1
    # (background-snapshot records memory as of its start, then resumes the guest).
    if a.was_running:
        mon.cmd("stop")
        a.stopped = time.monotonic()
    failpoint("save:stopped")
    tags = [(image, f"{TAG_PREFIX}{a.name}-{os.urandom(6).hex()}") for image in vm.images()]
    for image, tag in tags if a.along is None else ():
        mon.cmd("blockdev-snapshot-internal-sync", device=image.node, name=tag)
        a.tags.append((image, tag))
    if a.along is not None:  # one transaction: the snapshots and the caller's actions
        mon.cmd("transaction", actions=[{"type": "blockdev-snapshot-internal-sync", "data": {
            "device": image.node, "name": tag}} for image, tag in tags] + a.along(tags))
        a.tags.extend(tags)
    failpoint("save:snapshotted")


def _stream(a: _Attempt, progress: Progress | None) -> None:
    """QEMU writes the state into the memory file, checksummed as it grows; flushed; a RAM
    file cloned beside it."""
    mon = a.mon
    memfile = a.tmp / ckpstore.MEMORY
    fd = open_fd_for(memfile, write=True)
    direct = None
    try:
        # A mapped-ram file is written at many offsets at once (scattered).
        a.follower = Follower(memfile, scattered=a.mapped)
        a.follower.start()
        if a.mapped:
            if migration.direct_io_usable(mon, memfile):
                direct = migration.open_direct(memfile, write=True)
            migration.use_direct_io(mon, direct is not None)
        a.direct_io = direct is not None
        channel = migration.attach(mon, fd, "cbsd-save", a.caps, direct)
    finally:
        os.close(fd)
        if direct is not None:
            os.close(direct)
    started = a.migrating = time.monotonic()
    mon.cmd("migrate", uri=channel.uri)
    failpoint("save:migrating")
    a.info = mon.wait_migration(progress=_ram_progress(progress))
    # background-snapshot (live=1) runs the guest again early in the write: one query says
    # whether it did, so the guest gap recorded below is the one the guest saw.
    a.resumed_by_qemu = a.live and a.stopped is not None and mon.running()
    migration.detach(mon, channel)
    if progress is not None:
        total = int(a.info.get("ram", {}).get("total", 1))
        progress(total, total)  # done: lets a progress bar finish and go away
    a.elapsed = time.monotonic() - started
    size, digest = a.follower.finish()
    a.follower = None
    fsync_path(memfile)
    a.files = {ckpstore.MEMORY: FileEntry(size, digest)}
    if a.ram_file:
        ramfile.clone_for_checkpoint(a.vm, a.tmp / ckpstore.RAM, stays_running=a.keep_running)
    failpoint("save:saved")


def _seal_and_publish(a: _Attempt, final: Path) -> tuple[Manifest, Path | None]:
    """The VM put back as it was, the state sealed (manifest), read back and renamed into
    place. The manifest and the older state it replaced, if any (for the caller to drop)."""
    vm = a.vm
    _disks_in_place(vm)
    if a.keep_running:
        put_back(a.mon, a.was_running)
        a.guest_gap = _guest_gap(a)
        a.clock_note = _set_clock(vm, a.mon, a.stopped)
        a.stopped = None  # accounted for: a later failure's rollback has no stop to report
    else:
        a.guest_gap = _guest_gap(a)  # it is not run again: stood still until sealed
    (a.tmp / INTENT).unlink()
    if a.ram_file:  # checksummed while the guest runs on: the clone no longer changes
        a.files[ckpstore.RAM] = FileEntry(*ckpstore.digest_file(a.tmp / ckpstore.RAM))
    manifest = _manifest(a)
    generation.record(vm, a.mon, manifest, a.tmp)  # the vmgenid device, if the state has it
    ckpstore.save_manifest(manifest, a.tmp)
    fsync_dir(a.tmp)
    _verify_written(a.tmp, a.files)
    failpoint("save:verified")
    cancel.check()  # last moment a cancel rolls back; once published, it stands
    return manifest, ckpstore.publish(a.tmp, final)


def _guest_gap(a: _Attempt) -> float:
    """How long the guest's vCPUs stood still for this save, up to now (0 if this save did
    not stop them). With live=1 QEMU's background snapshot resumed them once the write began:
    the gap is then cbsd's stop until 'migrate', plus the pause QEMU reports for its own
    start of the snapshot (query-migrate's `downtime`, ms)."""
    if a.stopped is None:
        return 0.0
    if a.resumed_by_qemu:
        return a.migrating - a.stopped + float(a.info.get("downtime") or 0) / 1000
    return time.monotonic() - a.stopped


def _save_error(vm: VM, e: BaseException, kind: str, name: str) -> BaseException:
    """What a failed save reports (after the rollback)."""
    unexpected = not isinstance(e, CbsdError | KeyboardInterrupt)
    if (unexpected or isinstance(e, QemuError)) and not vm.alive():
        detail = f" ({e})" if unexpected else ""
        return QemuError(f"{vm.jname}: QEMU exited while the {kind} was being written"
                         f"{detail}; the VM is Off")
    if isinstance(e, OSError):
        return os_error(e, f"{vm.jname}: cannot write {kind} {name}")
    if isinstance(e, MigrationFailed) and e.no_space:
        return NoSpaceError(f"{vm.jname}: cannot write {kind} {name}: no space left on device")
    return e


def _disks_in_place(vm: VM) -> None:
    """The disk files QEMU wrote the snapshots into are the VM's own: a disk moved or deleted
    under a running QEMU keeps being written through QEMU's open file, and a checkpoint of it
    could never be restored."""
    held = process.open_files(vm.pid)
    for disk in (image.path for image in vm.images()):
        try:
            st = os.stat(disk)
        except OSError:
            raise CheckpointError(f"{vm.jname}: disk {disk} is gone (moved or deleted while "
                                  "the VM runs): a checkpoint of it could not be restored")
        if held is not None and (st.st_dev, st.st_ino) not in held:
            raise CheckpointError(f"{vm.jname}: disk {disk} is not the file QEMU has open "
                                  "(replaced while the VM runs): a checkpoint of it could not "
                                  "be restored")


def _set_migration(mon: Monitor, caps: frozenset[str], live: bool) -> None:
    if live and "background-snapshot" not in caps:
        raise CbsdError(f"{mon.jname}: live=1 needs QEMU's background-snapshot, which this "
                        "QEMU lacks")
    if "background-snapshot" in caps:
        try:
            mon.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "background-snapshot", "state": live}])
        except QmpCommandError as e:
            raise CbsdError(f"{mon.jname}: live=1 is not supported on this host "
                            f"({e.desc})") from e
    mon.cmd("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BANDWIDTH})


def _check_space(vm: VM, directory: Path) -> None:
    """Refuse before writing when the state clearly cannot fit (RSS bounds the stream size)."""
    need = min(process.resident_bytes(vm.pid), vm.spec.ram) + (4 << 20)
    free = free_bytes(directory)
    if free < need:
        raise NoSpaceError(f"{vm.jname}: no space left on device for the saved state: about "
                           f"{need >> 20} MiB needed, {free >> 20} MiB free in {directory}")


def _ram_progress(progress: Progress | None) -> Callable[[dict[str, Any]], None] | None:
    if progress is None:
        return None
    return lambda ram: progress(max(0, ram["total"] - ram["remaining"]), ram["total"])


def _verify_written(tmp: Path, files: dict[str, FileEntry]) -> None:
    """What we publish must read back as what we checksummed and sealed."""
    m = ckpstore.read_manifest(tmp)
    for fname, entry in files.items():
        actual = (tmp / fname).stat().st_size
        if actual != entry.size or m.files.get(fname) != entry:
            raise CheckpointError(f"verification failed: {fname} file has {actual} bytes, "
                                  f"checksummed {entry.size}")


def _rollback(vm: VM, mon: Monitor, tmp: Path, tags: list[tuple[Image, str]],
              was_running: bool, *, wait_out: bool = False) -> None:
    """Undo a failed save, leaving the VM as it was (even when a power-off was requested: that
    was conditional on success). Every step is attempted even if an earlier one fails."""
    if vm.alive():
        with contextlib.suppress(CbsdError, OSError):
            _end_migration(mon, wait_out=wait_out)
        with contextlib.suppress(CbsdError, OSError):
            put_back(mon, was_running)
    try:
        # Offline (qemu-img) when QEMU is gone: its lock on the image went with it.
        delete_tags(vm, tags)
    except (CbsdError, OSError):
        return  # keep tmp: it tells the next command to sweep the orphaned disk snapshots
    remove_tree(tmp)


# How long a mapped-ram save is waited out before it is cancelled after all: such a save of a
# stopped guest to a local file ends in seconds (1 GiB in ~0.3 s here); only a wedged disk
# takes longer, and then a QEMU that may crash is better than a command that never returns.
WAIT_OUT_S = 120.0


def _end_migration(mon: Monitor, *, wait_out: bool = False) -> None:
    """Stop an outgoing migration still in progress. *wait_out*: let it finish (its file is
    discarded by the caller) instead of cancelling it. QEMU 10.0 can crash when a mapped-ram +
    multifd save is cancelled: a multifd sender thread still marks pages in the RAM block's
    file bitmap that the cancel's cleanup has already freed (segfault in `mig/src/send_N`;
    here about 1 in 10 cancelled hibernations with a cold page cache, docs/checkpoints.md)."""
    if mon.cmd("query-migrate").get("status") not in IN_PROGRESS:
        return
    if wait_out and _ended_within(mon, WAIT_OUT_S, 0.005):
        return
    mon.cmd("migrate_cancel")
    _ended_within(mon, 10, 0.01)


def _ended_within(mon: Monitor, seconds: float, poll: float) -> bool:
    """Whether the outgoing migration ends (completed, failed, cancelled) within *seconds*."""
    deadline = time.monotonic() + seconds
    while mon.cmd("query-migrate").get("status") not in ENDED:
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def _manifest(a: _Attempt) -> Manifest:
    created, ts = ckpstore.now_iso()
    vm, host = a.vm, a.vm.ctx.host
    ram = a.info.get("ram", {})
    manifest = Manifest(
        kind=a.kind, name=a.name, jname=vm.jname, created=created, created_ts=ts,
        qemu_version=host.version, accel=host.accel, machine=vm.spec.machine,
        spec=vm.spec.to_dict(), restore_relevant=vm.spec.restore_relevant(),
        argv=vm.argv(incoming=True, ram_file=ckpstore.RAM in a.files),
        was_running=a.was_running, live=a.live,
        disk_snapshots=[DiskSnapshot(image.name, t) for image, t in a.tags],
        files=a.files,
        migration={"seconds": round(a.elapsed, 4), "ram_total": ram.get("total"),
                   "transferred": ram.get("transferred")},
    )
    manifest.agent = a.agent
    manifest.timings = Timings(round(time.monotonic() - a.began, 4), round(a.guest_gap, 4))
    if a.mapped:  # the load must switch on the same capabilities
        manifest.migration["capabilities"] = list(migration.MAPPED_RAM)
        manifest.migration[migration.DIRECT_IO] = a.direct_io  # for the record
    manifest.parent = tree.parent_for(vm.ctx.workdir, vm.jname, a.name, a.kind)
    if a.stamp is not None:
        a.stamp(manifest)
    return manifest
