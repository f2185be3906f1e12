"""bimport's staging folders: var/tmp/bimport-ID, where an archive is received and verified
before anything is registered.

Each folder has a lock file beside it (bimport-ID.lock), created and flock-held before the
folder exists, so a sweep never takes a folder a live bimport is writing for an abandoned one.
A folder marked STAGED is complete and verified and waits for bmove's commit; a commit leaves
a record (bimport-ID.done, the VM's name) that makes a retried commit or a late abort answer
what happened instead of importing twice or dropping a registered VM.

What registering relies on is checked here, in the folder, before anything is registered
(check_images, check_snapshots: docs/many-hosts.md, "Trust model: disk images and archives").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from cbsd.core.checkpoint.load import check_intact
from cbsd.core.manage.disks import DISK_SUFFIX, disk_file_problem
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import EFI_VARS
from cbsd.core.vm.states import TAG_PREFIX
from cbsd.errors import ArchiveError, CheckpointError, UsageError
from cbsd.model import VMSpec
from cbsd.qemu import img
from cbsd.storage import ckpstore
from cbsd.storage.atomic import remove_tree
from cbsd.storage.paths import Workdir

PREFIX = "bimport-"
STAGED = "staged"  # in a staging folder: complete and verified, waiting for a commit
STALE = 24 * 3600.0  # a staged folder, or a commit record, older than this is swept


def base(ctx: Context) -> Path:
    return ctx.workdir.root / "var" / "tmp"


def lock_of(path: Path) -> Path:
    """A staging folder's lock file, beside it: taken before the folder exists, so no sweep
    ever sees the folder without a live holder's lock on it."""
    return path.with_name(path.name + ".lock")


def new(ctx: Context) -> tuple[Path, int]:
    """A new staging folder, flock-held (its lock file) by this process until it is done."""
    root = base(ctx)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = root / f"{PREFIX}{os.urandom(8).hex()}"
    fd = os.open(lock_of(path), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    path.mkdir(mode=0o700)
    return path, fd


def drop(path: Path) -> None:
    """A staging folder and its lock file (the caller holds the lock)."""
    remove_tree(path)
    lock_of(path).unlink(missing_ok=True)


def staged(ctx: Context, ident: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{16}", ident):
        raise ArchiveError(f"bimport: bad staging id '{ident}'")
    return base(ctx) / f"{PREFIX}{ident}"


def sweep(ctx: Context) -> None:
    """Remove staging folders no live bimport holds: cut short (no STAGED mark), or staged
    for a commit that has not come for a day; and commit records older than a day."""
    root = base(ctx)
    if not root.is_dir():
        return
    for done in root.glob(f"{PREFIX}*.done"):  # what a late commit retry would ask
        with contextlib.suppress(OSError):
            if time.time() - done.stat().st_mtime > STALE:
                done.unlink()
    for lock in root.glob(f"{PREFIX}*.lock"):
        path = lock.with_name(lock.name[:-len(".lock")])
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            mark = path / STAGED
            if not mark.exists() or time.time() - mark.stat().st_mtime > STALE:
                drop(path)
        finally:
            os.close(fd)


def done_record(path: Path) -> Path:
    return path.with_name(path.name + ".done")


@contextlib.contextmanager
def held(path: Path) -> Iterator[str | None]:
    """The staging folder *path* flock-held (commit and abort exclude each other); yields
    the name of the VM it was committed as, or None."""
    try:
        fd = os.open(lock_of(path), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        done = done_record(path)
        yield done.read_text() if done.exists() else None
    finally:
        if fd >= 0:
            os.close(fd)


# --- checks of what a staging folder holds --------------------------------------------------

def check_snapshots(dirs: list[Path], images: dict[str, img.ImageInfo]) -> set[str]:
    """Every saved state (*dirs*) has its manifest and every disk snapshot it names is in
    its image (the check a restore makes, load.check_intact); the tags they own."""
    present = {name: set(i.snapshots) for name, i in images.items()}
    owned: set[str] = set()
    for ckdir in dirs:
        try:
            m = ckpstore.read_manifest(ckdir)
            check_intact(ckdir, m, present, checksums=False)
        except CheckpointError as e:
            raise ArchiveError(f"the archive's {e}") from None
        owned |= {s.tag for s in m.disk_snapshots}
    return owned


def check_images(wd: Workdir, folder: Path, spec: VMSpec) -> dict[str, img.ImageInfo]:
    """Every qcow2 the archive brings is a self-contained one qemu-img reads (a disk detached
    before the export too: it may be attached again); the definition's disks are such
    files, none of them cbsd's own (core/manage/disks.py). The VM's images (what checkpoints
    snapshot: its disks, its UEFI variable store), with what qemu-img says of them."""
    for file in spec.disks:
        why = disk_file_problem(wd, spec.jname, file)
        if why:
            raise ArchiveError(f"the archive's definition lists a bad disk: {why}")
    if len(set(spec.disks)) != len(spec.disks):
        raise ArchiveError("the archive's definition lists a disk twice")
    names = [*spec.disks, *([EFI_VARS] if spec.efi == "uefi" else [])]
    vm_dir = folder / "vm"
    files = {p.name for p in vm_dir.glob(f"*{DISK_SUFFIX}")} if vm_dir.is_dir() else set()
    found: dict[str, img.ImageInfo] = {}
    for name in sorted(files | set(names)):
        if name not in files:
            raise ArchiveError(f"the archive lacks vm/{name}, which its definition names")
        try:
            found[name] = img.check(vm_dir / name, f"the archive's vm/{name}")
        except UsageError as e:
            raise ArchiveError(str(e)) from None
    return {name: found[name] for name in names}


def drop_orphans(folder: Path, images: dict[str, img.ImageInfo], owned: set[str]) -> None:
    """Delete cbsd's disk snapshots that no saved state in the folder owns (those of
    checkpoints that were not exported), before the VM is registered."""
    for name, i in images.items():
        for tag in sorted(i.snapshots):
            if tag.startswith(TAG_PREFIX) and tag not in owned:
                img.snapshot_delete(folder / "vm" / name, tag)
