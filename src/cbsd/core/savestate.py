"""Saving and loading a VM's complete state: the one engine behind checkpoints and hibernation.

Save (VM On or Paused, lock held):
  1. stop the vCPUs (not with live=1), so memory and disks are taken at one instant;
  2. an internal qcow2 snapshot of every disk (metadata only, a few ms);
  3. QEMU migrates RAM, CPU and device state into a file we opened (fd:), bandwidth uncapped,
     while a thread checksums the file as it grows (no second pass);
  4. fsync, manifest, fsync, verify, rename into place; the VM is put back as it was.
Any failure or signal undoes 1-4: disk snapshots deleted, temporary files removed, VM resumed.

Load (VM Off): manifest checksum, compatibility with this VM and host, file checksums and disk
snapshots are all checked before QEMU is launched; then disks are reverted, QEMU starts with
``-incoming defer -S`` and reads the stream; the guest runs only once the load completed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cbsd import cancel
from cbsd.core.vm import VM, free_bytes
from cbsd.errors import Cancelled, CbsdError, CheckpointError, NoSpaceError, QemuError
from cbsd.failpoints import failpoint
from cbsd.qemu import img, process
from cbsd.qemu.host import machine_known
from cbsd.qemu.qmp import Monitor, open_fd_for
from cbsd.storage import ckpstore
from cbsd.storage.atomic import fsync_dir, fsync_path, os_error, remove_tree, remove_tree_later

Progress = Callable[[int, int], None]
TAG_PREFIX = "cbsd-"
UNLIMITED_BANDWIDTH = 1 << 40


WRITEBACK_CHUNK = 32 << 20


def _writeback_starter() -> Callable[[int, int, int], None]:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk without waiting.
    Python's os module lacks it; without it (not Linux), fall back to doing nothing."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, off, n: None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return lambda fd, off, n: fn(fd, off, n, 2)  # 2 = SYNC_FILE_RANGE_WRITE


class _Follower(threading.Thread):
    """Follows a file while QEMU appends its stream to it (in order): checksums each new range
    and starts its writeback to disk right away, so the disk works while QEMU still writes and
    the final fsync has little left to do."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        import xxhash

        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._hash = xxhash.xxh3_128()
        self._writeback = _writeback_starter()
        self._flushed = 0
        self._writer_done = threading.Event()
        self._abort = threading.Event()
        self.size = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._abort.is_set():
                chunk = os.read(self._fd, ckpstore.CHUNK)
                if chunk:
                    self._hash.update(chunk)
                    self.size += len(chunk)
                    if self.size - self._flushed >= WRITEBACK_CHUNK:
                        self._writeback(self._fd, self._flushed, self.size - self._flushed)
                        self._flushed = self.size
                elif self._writer_done.is_set():
                    return
                else:
                    time.sleep(0.002)
        except BaseException as e:  # reported by finish()
            self.error = e
        finally:
            os.close(self._fd)

    def finish(self) -> tuple[int, str]:
        self._writer_done.set()
        self.join()
        if self.error:
            raise self.error
        return self.size, self._hash.hexdigest()

    def abandon(self) -> None:
        self._abort.set()
        self._writer_done.set()
        self.join()


# --- disk snapshots ---------------------------------------------------------------------------

def _disk_tags(vm: VM, manifest: ckpstore.Manifest) -> list[tuple[int, str]]:
    index = {d: i for i, d in enumerate(vm.spec.disks)}
    return [(index[s["disk"]], s["tag"]) for s in manifest.disk_snapshots if s["disk"] in index]


def delete_tags(vm: VM, tags: list[tuple[int, str]]) -> None:
    """Release internal disk snapshots: through QEMU while it runs (it holds the image's lock),
    with qemu-img otherwise."""
    online = vm.alive()
    for i, tag in tags:
        disk = Path(vm.paths.disks[i])
        if online:
            try:
                vm.monitor().cmd("blockdev-snapshot-delete-internal-sync", device=f"disk{i}",
                                 name=tag)
            except QemuError:
                if tag in img.snapshots(disk):
                    raise
        elif disk.exists() and tag in img.snapshots(disk):
            img.snapshot_delete(disk, tag)


def published_tags(vm: VM) -> set[str]:
    wd = vm.ctx.workdir
    tags: set[str] = set()
    states = ckpstore.list_states(wd.checkpoints(vm.jname))
    if ckpstore.is_complete(wd.hibernation(vm.jname)):
        states.append((wd.hibernation(vm.jname), None))
    for path, m in states:
        try:
            m = m or ckpstore.read_manifest(path)
        except CheckpointError:
            continue  # a damaged state keeps its snapshots until it is destroyed
        tags |= {s["tag"] for s in m.disk_snapshots}
    return tags


INTENT = "intent"  # in a temporary save directory: the run state to return to


def recover(vm: VM) -> None:
    """Bring a VM back to a sound state after an interrupted (even kill -9'd) command. Needs the
    VM's lock. Handles, in QEMU's own terms:
      - a save killed mid-way: its temporary files and disk snapshots go; the VM gets back the
        run state the save recorded (a completed migration leaves 'postmigrate', disks inactive);
      - a restore or resume killed before the load finished ('inmigrate'): that QEMU is ended;
      - a hibernation killed after its image was published but before QEMU ended: finished;
      - a resume killed after loading but before dropping its image: the image is dropped (it
        must never be resumed again over a disk that moved on).
    """
    wd = vm.ctx.workdir
    doomed: list[Path] = []
    for d in (wd.checkpoints(vm.jname), wd.system(vm.jname)):
        if d.is_dir():
            doomed += ckpstore.recover(d)
    resume = any(_read_intent(p) == "running" for p in doomed)
    image = wd.hibernation(vm.jname)
    state = vm.monitor().status() if vm.alive() else None
    if state == "inmigrate":
        vm.kill()
    elif state == "postmigrate" and ckpstore.is_complete(image):
        vm.power_off()
    elif state is not None and ckpstore.is_complete(image):
        _drop(vm, image)
    elif state == "postmigrate":
        vm.monitor().cmd("cont")
        if not resume:
            vm.monitor().cmd("stop")
    elif state == "paused" and resume:
        vm.monitor().cmd("cont")
    for path in doomed:
        remove_tree(path)
    if doomed:
        _sweep_orphans(vm)


def _read_intent(path: Path) -> str:
    try:
        return (path / INTENT).read_text().strip()
    except OSError:
        return ""


def _sweep_orphans(vm: VM) -> None:
    """Delete cbsd's disk snapshots that no published state owns any more."""
    keep = published_tags(vm)
    for i, disk in enumerate(vm.paths.disks):
        if Path(disk).exists():
            orphans = [(i, t) for t in img.snapshots(Path(disk))
                       if t.startswith(TAG_PREFIX) and t not in keep]
            delete_tags(vm, orphans)


# --- save -------------------------------------------------------------------------------------

def _put_back(mon: Monitor, was_running: bool) -> None:
    """Return the VM to the run state it had. After a completed migration QEMU 7.2 leaves it in
    'postmigrate' with its disks inactive; 'cont' reactivates them (probed, not assumed)."""
    # QEMU reports the migration completed (or failed) a moment before its migration thread
    # leaves 'finish-migrate' for 'postmigrate'; a 'cont' sent in between is undone by it.
    deadline = time.monotonic() + 10
    while (state := mon.status()) == "finish-migrate" and time.monotonic() < deadline:
        time.sleep(0.001)
    if was_running:
        if state != "running":
            mon.cmd("cont")
    elif state == "postmigrate":
        # QEMU 7.2 has no way to reactivate disks without running the vCPUs: the guest runs
        # for one QMP round trip (~0.5 ms). Sending 'stop' without awaiting 'cont' is no
        # way out: QEMU then asserts on a write to a still-inactive disk.
        mon.cmd("cont")
        mon.cmd("stop")


def save(vm: VM, final: Path, *, name: str, kind: str, live: bool = False,
         keep_running: bool = True, progress: Progress | None = None) -> ckpstore.Manifest:
    """Write the VM's complete state to *final* (replacing an older one only once complete).

    keep_running=False leaves QEMU stopped after the save (the caller ends it)."""
    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mon = vm.monitor()
    recover(vm)
    _check_space(vm, final.parent)
    tmp = ckpstore.new_tmpdir(final)
    tags: list[tuple[int, str]] = []
    follower: _Follower | None = None
    was_running = mon.running()
    live = live and was_running
    try:
        (tmp / INTENT).write_text("running" if was_running else "paused")
        _set_migration(mon, live)
        # Disk and memory must be of the same instant: freeze first, even for live=1
        # (background-snapshot records memory as of its start, then resumes the guest).
        if was_running:
            mon.cmd("stop")
        failpoint("save:stopped")
        for i in range(len(vm.paths.disks)):
            tag = f"{TAG_PREFIX}{name}-{os.urandom(6).hex()}"
            mon.cmd("blockdev-snapshot-internal-sync", device=f"disk{i}", name=tag)
            tags.append((i, tag))
        failpoint("save:snapshotted")
        memfile = tmp / ckpstore.MEMORY
        fd = open_fd_for(memfile, write=True)
        try:
            follower = _Follower(memfile)
            follower.start()
            mon.send_fd(fd, "cbsd-save")
        finally:
            os.close(fd)
        started = time.monotonic()
        mon.cmd("migrate", uri="fd:cbsd-save")
        failpoint("save:migrating")
        info = mon.wait_migration(progress=_ram_progress(progress))
        if progress is not None:
            total = int(info.get("ram", {}).get("total", 1))
            progress(total, total)  # done: lets a progress bar finish and go away
        elapsed = time.monotonic() - started
        size, digest = follower.finish()
        follower = None
        fsync_path(memfile)
        failpoint("save:saved")
        if keep_running:
            _put_back(mon, was_running)
        (tmp / INTENT).unlink()
        manifest = _manifest(vm, name, kind, was_running, live, tags, size, digest, info,
                             elapsed)
        manifest.save(tmp)
        fsync_dir(tmp)
        _verify_written(tmp, size)
        failpoint("save:verified")
        cancel.check()  # last moment a cancel rolls back; once published, it stands
        old = ckpstore.publish(tmp, final)
    except BaseException as e:
        if follower is not None:
            with contextlib.suppress(Exception):
                follower.abandon()
        _rollback(vm, mon, tmp, tags, was_running)
        unexpected = not isinstance(e, CbsdError | KeyboardInterrupt)
        if (unexpected or isinstance(e, QemuError)) and not vm.alive():
            detail = f" ({e})" if unexpected else ""
            raise QemuError(f"{vm.jname}: QEMU exited while the {kind} was being "
                            f"written{detail}; the VM is Off") from e
        if isinstance(e, OSError):
            raise os_error(e, f"{vm.jname}: cannot write {kind} {name}") from e
        if isinstance(e, QemuError) and "space" in str(e).lower():
            raise NoSpaceError(f"{vm.jname}: cannot write {kind} {name}: "
                               "no space left on device") from e
        raise
    failpoint("save:published")
    if old is not None:
        _drop(vm, old)
    return manifest


def _set_migration(mon: Monitor, live: bool) -> None:
    caps = {c["capability"] for c in mon.cmd("query-migrate-capabilities")}
    if live and "background-snapshot" not in caps:
        raise CbsdError(f"{mon.jname}: live=1 needs QEMU's background-snapshot, which this "
                        "QEMU lacks")
    if "background-snapshot" in caps:
        try:
            mon.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "background-snapshot", "state": live}])
        except QemuError as e:
            raise CbsdError(f"{mon.jname}: live=1 is not supported on this host "
                            f"({str(e).split(': ', 2)[-1]})") from e
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


def _verify_written(tmp: Path, size: int) -> None:
    """What we publish must read back as what we checksummed and sealed."""
    m = ckpstore.read_manifest(tmp)
    actual = (tmp / ckpstore.MEMORY).stat().st_size
    if actual != size or m.memory_size != size:
        raise CheckpointError(f"verification failed: memory file has {actual} bytes, "
                              f"checksummed {size}")


def _rollback(vm: VM, mon: Monitor, tmp: Path, tags: list[tuple[int, str]],
              was_running: bool) -> None:
    """Undo a failed save, leaving the VM as it was (even when a power-off was requested: that
    was conditional on success). Every step is attempted even if an earlier one fails."""
    if vm.alive():
        for step in (lambda: _cancel_migration(mon), lambda: _put_back(mon, was_running)):
            with contextlib.suppress(CbsdError, OSError):
                step()
    try:
        # Offline (qemu-img) when QEMU is gone: its lock on the image went with it.
        delete_tags(vm, tags)
    except (CbsdError, OSError):
        return  # keep tmp: it tells the next command to sweep the orphaned disk snapshots
    remove_tree(tmp)


def _cancel_migration(mon: Monitor) -> None:
    state = mon.cmd("query-migrate").get("status")
    if state in ("active", "setup", "device", "pre-switchover"):
        mon.cmd("migrate_cancel")
        deadline = time.monotonic() + 10
        while mon.cmd("query-migrate").get("status") not in ("cancelled", "failed", "completed"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)


def _drop(vm: VM, path: Path) -> None:
    """Delete a saved state: first hide it (never listed again), then release its disk
    snapshots (under the VM's lock), then remove its files after the command returns."""
    try:
        m: ckpstore.Manifest | None = ckpstore.read_manifest(path)
    except CheckpointError:
        m = None
    if not path.name.startswith("."):
        path = ckpstore.retire(path)
    if m is not None:
        delete_tags(vm, _disk_tags(vm, m))
    remove_tree_later(path)


def drop(vm: VM, path: Path) -> None:
    """Delete a published state and the disk snapshots it owns (VM running or not)."""
    _drop(vm, path)
    _sweep_orphans(vm)  # a damaged manifest cannot name its snapshots


def _manifest(vm: VM, name: str, kind: str, was_running: bool, live: bool,
              tags: list[tuple[int, str]], size: int, digest: str, info: dict[str, Any],
              elapsed: float) -> ckpstore.Manifest:
    created, ts = ckpstore.now_iso()
    host = vm.ctx.host
    return ckpstore.Manifest({
        "format": ckpstore.FORMAT,
        "kind": kind,
        "name": name,
        "jname": vm.jname,
        "created": created,
        "created_ts": ts,
        "qemu_version": host.version,
        "accel": host.accel,
        "machine": vm.spec.machine,
        "spec": vm.spec.to_dict(),
        "restore_relevant": vm.spec.restore_relevant(),
        "argv": vm.argv(incoming=True),
        "was_running": was_running,
        "live": live,
        "disk_snapshots": [{"disk": vm.spec.disks[i], "tag": t} for i, t in tags],
        "files": {ckpstore.MEMORY: {"size": size, "xxh3_128": digest}},
        "migration": {"seconds": round(elapsed, 4), "ram_total": info.get("ram", {}).get("total"),
                      "transferred": info.get("ram", {}).get("transferred")},
    })


# --- load -------------------------------------------------------------------------------------

def check_restorable(vm: VM, ckdir: Path) -> ckpstore.Manifest:
    """Everything that can be checked without launching QEMU or reading the files' data (their
    checksums are _Verifier's, on a second thread). CheckpointError if any fails."""
    if not ckdir.is_dir() or ckdir.is_symlink():
        raise CheckpointError(f"{vm.jname}: no checkpoint {ckpstore.state_name(ckdir)}")
    m = ckpstore.read_manifest(ckdir)
    what = f"{vm.jname}: {ckpstore.describe(ckdir)}"
    saved, now = m.data["restore_relevant"], vm.spec.restore_relevant()
    diffs = [f"{k} was {saved.get(k)!r}, now {now.get(k)!r}" for k in now if saved.get(k) != now[k]]
    if diffs:
        raise CheckpointError(f"{what} is incompatible with the VM's configuration now: "
                              + "; ".join(diffs))
    host = vm.ctx.host
    if m.data["accel"] != host.accel:
        raise CheckpointError(f"{what} was taken under {m.data['accel']}, this host runs "
                              f"{host.accel}: cannot restore")
    if _version(m.data["qemu_version"])[:2] > _version(host.version)[:2]:
        raise CheckpointError(f"{what} was saved by QEMU {m.data['qemu_version']}, newer than "
                              f"this host's {host.version}: cannot restore")
    if not machine_known(host, m.data["machine"]):
        raise CheckpointError(f"{what} needs machine type {m.data['machine']}, which this "
                              f"QEMU {host.version} does not provide")
    try:
        check_intact(vm, ckdir, m, disk_snapshots(vm), checksums=False)
    except CheckpointError as e:
        raise CheckpointError(f"{vm.jname}: {e}") from None
    return m


def disk_snapshots(vm: VM) -> dict[str, set[str]]:
    """The internal snapshots each of the VM's disks holds now (one qemu-img call per disk)."""
    return {name: set(img.snapshots(Path(path))) if Path(path).exists() else set()
            for name, path in zip(vm.spec.disks, vm.paths.disks, strict=True)}


def check_intact(vm: VM, ckdir: Path, m: ckpstore.Manifest,
                 present: dict[str, set[str]], checksums: bool = True) -> None:
    """A saved state's own integrity: every disk snapshot it names is still in *present*
    (from disk_snapshots), every file matches its size (and checksum)."""
    for s in m.disk_snapshots:
        if s["tag"] not in present.get(s["disk"], set()):
            raise CheckpointError(f"{ckpstore.describe(ckdir)} is damaged: disk snapshot "
                                  f"{s['tag']} is missing from {s['disk']}")
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
            ckpstore.verify_checksums(self._ckdir, ckpstore.read_manifest(self._ckdir))
        except CheckpointError as e:
            self._error = CheckpointError(f"{self._vm.jname}: {e}")
        except BaseException as e:  # handed to the main thread, which raises it
            self._error = e

    def result(self) -> None:
        self.join()
        if self._error is not None:
            raise self._error


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def load(vm: VM, ckdir: Path, *, paused: bool) -> None:
    """Restore a saved state into a stopped VM. The state itself is left in place.

    The memory file's checksum is verified while QEMU starts, and the disks are reverted only
    once it matched: QEMU waiting for an incoming migration holds its disks inactive (no
    lock, nothing written, metadata re-read when they are activated at the end of the load),
    so a damaged state still leaves the disks untouched."""
    checksums = _Verifier(vm, ckdir)
    try:
        m = check_restorable(vm, ckdir)
        mon = vm.launch(incoming=True)
    finally:
        checksums.join()  # never leave a thread reading the files behind us
    try:
        failpoint("load:launched")
        checksums.result()
        failpoint("load:verified")
        for disk_index, tag in _disk_tags(vm, m):
            img.snapshot_apply(Path(vm.paths.disks[disk_index]), tag)
        failpoint("load:reverted")
        fd = open_fd_for(ckdir / ckpstore.MEMORY, write=False)
        try:
            mon.send_fd(fd, "cbsd-load")
            mon.cmd("migrate-incoming", uri="fd:cbsd-load")
            _wait_incoming(vm, mon, fd, m.memory_size)
        finally:
            os.close(fd)
        failpoint("load:loaded")
        if not paused:
            mon.cmd("cont")
        expected = "paused" if paused else "running"
        if mon.status() != expected:
            raise QemuError(f"{vm.jname}: after loading the state QEMU reports "
                            f"'{mon.status()}', expected '{expected}'")
    except BaseException as e:
        died = not vm.alive()
        reason = _qemu_log_tail(vm)
        vm.kill()
        what = ckpstore.describe(ckdir)
        if died and not isinstance(e, KeyboardInterrupt | Cancelled):
            raise QemuError(f"{vm.jname}: QEMU exited while loading the {what}"
                            f"{': ' + reason if reason else ''}; the VM is Off") from e
        if isinstance(e, QemuError) and reason:
            raise QemuError(f"{vm.jname}: loading the {what} failed: {reason}") from e
        raise


# Following the load through the file offset: QEMU reads its first bytes within milliseconds
# of migrate-incoming; if the offset shows nothing for FOLLOW_START (a QEMU that reads with
# pread) or stops moving for FOLLOW_STALL (stuck), ask QMP instead, which answers between
# stretches of the load (or times out).
FOLLOW_START = 1.0
FOLLOW_STALL = 30.0


def _wait_incoming(vm: VM, mon: Monitor, fd: int, size: int) -> None:
    """Until QEMU has loaded the state. While it loads, QEMU answers QMP only now and then
    (the load runs in its main loop, and reading a file never makes it wait: queries during a
    3 GB load here waited 0.5-1 s each, longer on a slower disk), so a QMP query can outlast
    any timeout, and polling would compete with the load. Instead follow the load through the
    file offset, which QEMU's copy of *fd* shares with ours, and ask QMP only once QEMU has
    read everything. A `cont` must wait for that too: one sent during the load is lost."""
    exited = f"{vm.jname}: QEMU exited while loading the state"
    delay, last = 0.002, 0
    moved = time.monotonic()
    while (pos := os.lseek(fd, 0, os.SEEK_CUR)) < size:
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
        if state != "inmigrate":
            break
        cancel.check()
        time.sleep(0.002)
    info = mon.cmd("query-migrate")
    if info.get("status") not in (None, "completed"):
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
