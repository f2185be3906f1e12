"""The standby's replica of a VM (docs/cluster.md "Replication"; the owner's half is
core/cluster/ship.py). Nothing here is in the standby's inventory until promote():

    WORKDIR/cluster/replicas/JNAME/        0700, files 0600
        store/                   a chunk store (storage/chunkstore.Store): memory chunks
        disks/IMAGE              one replica qcow2 per image of the VM; the published
                                 generation G is the internal snapshot cbsd-rep-G of each
        gen-G.ckp/               generation G's checkpoint (ckpstore format, its memory a
                                 recipe into store/), its manifest sealed
        replica.json             THE publish point (write_atomic): generation, source, spec,
                                 images (disks/ files it names; any other is removed)
        .lock                    held (flock) by whoever changes the replica

Anything replica.json does not name is an interrupted apply: the next apply (and promote)
first reverts every image to cbsd-rep-G, deletes other cbsd-rep-* snapshots, other gen-*
folders and packs no published recipe references (recover). A generation is published only
after every chunk and disk byte it references is written, flushed and checked: the memory
stream rebuilt from the chunks against the checksum sealed by the owner, each disk against
the snapshot contents received (qemu-img compare), every member of the stream against the
seal of the archive that carried it (storage/archive.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cbsd import specs
from cbsd.core.checkpoint import tree
from cbsd.core.cluster import config
from cbsd.core.manage import cloudinit, lifecycle
from cbsd.core.vm.context import Context
from cbsd.errors import ArchiveError, CheckpointError, StateError
from cbsd.failpoints import failpoint
from cbsd.model import VMSpec
from cbsd.qemu import img
from cbsd.storage import ckpstore
from cbsd.storage.archive import Reader
from cbsd.storage.atomic import fsync_dir, remove_tree, write_atomic
from cbsd.storage.chunkstore import RECIPE, TMP_PREFIX, Recipe, Store
from cbsd.storage.manifest import DiskSnapshot, FileEntry
from cbsd.storage.paths import Workdir

KIND = "cbsd-replica"  # the stream's header says it is one (not an export archive)
TAG = "cbsd-rep-"
PUBLISHED = "replica.json"
ENTRY = struct.Struct("<16sI")  # a stream chunk as shipped: its XXH3-128 and length
NAME = "ha-"  # the checkpoint a generation becomes: ha-G (the owner keeps its own ha-G)


def folder(wd: Workdir, jname: str) -> Path:
    return config.folder(wd) / "replicas" / jname


@dataclass(frozen=True)
class Replica:
    jname: str
    generation: int
    source: str
    taken: float
    spec: dict[str, Any]
    stream: str  # the memory stream's XXH3-128 (the owner checks its base against it)
    root: Path
    images: frozenset[str] | None = None  # its images (None: a replica.json from before)

    @property
    def ckdir(self) -> Path:
        return self.root / f"gen-{self.generation}.ckp"

    @property
    def tag(self) -> str:
        return f"{TAG}{self.generation}"

    @property
    def checkpoint(self) -> str:
        return f"{NAME}{self.generation}"


def latest(wd: Workdir, jname: str) -> Replica | None:
    """The published generation of *jname*'s replica here, or None."""
    root = folder(wd, jname)
    try:
        raw = json.loads((root / PUBLISHED).read_text())
        images = raw.get("images")
        return Replica(jname, int(raw["generation"]), str(raw["source"]),
                       float(raw["taken"]), dict(raw["spec"]), str(raw["stream"]), root,
                       None if images is None else frozenset(str(i) for i in images))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StateError(f"{jname}: the replica's {PUBLISHED} is unreadable ({e})") from None


@contextlib.contextmanager
def held(wd: Workdir, jname: str) -> Iterator[Path]:
    """The replica's folder, locked (one apply or promote at a time; BusyError-free: the
    second waits, an apply takes seconds)."""
    root = folder(wd, jname)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield root
    finally:
        os.close(fd)


def _images(root: Path) -> list[Path]:
    d = root / "disks"
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def recover(wd: Workdir, jname: str) -> Replica | None:
    """Undo whatever an interrupted apply left (lock held): the published generation, as
    it was published."""
    rep = latest(wd, jname)
    root = folder(wd, jname)
    for leftover in (root / "disks").glob(".*") if (root / "disks").is_dir() else ():
        leftover.unlink()
    for image in _images(root):
        if rep is None or (rep.images is not None and image.name not in rep.images):
            # a first apply cut short (no generation to go back to), a disk the published
            # generation lacks (added by an apply cut short, or detached on the owner)
            image.unlink()
            continue
        tags = img.snapshots(image)
        if rep.tag not in tags:
            raise StateError(f"{jname}: the replica image {image.name} lacks {rep.tag} "
                             "(damaged): remove the replica and replicate again")
        img.snapshot_apply(image, rep.tag)
        for t in tags:
            if t.startswith(TAG) and t != rep.tag:
                img.snapshot_delete(image, t)
    for d in root.iterdir():
        if (d.name.startswith(("gen-", ".gen-")) and (rep is None or d != rep.ckdir)):
            remove_tree(d)
    store = Store(root / "store")
    if store.packs.is_dir():
        store.collect([Recipe.read(rep.ckdir / RECIPE)] if rep is not None else [])
    return rep


def status(wd: Workdir, jname: str) -> dict[str, Any]:
    """What the owner asks before it ships: the generation published here (None: none)."""
    rep = latest(wd, jname)
    if rep is None:
        return {"jname": jname, "generation": None}
    return {"jname": jname, "generation": rep.generation, "source": rep.source,
            "stream": rep.stream, "taken": rep.taken}


# --- applying a generation --------------------------------------------------------------

def apply(ctx: Context, jname: str, inp: IO[bytes]) -> dict[str, Any]:
    """Read one generation from *inp* (ship.py's stream), check it whole, publish it. The
    published one before it stays intact until the new one is published; anything wrong
    leaves it as it was."""
    wd = ctx.workdir
    with held(wd, jname) as root:
        rep = recover(wd, jname)
        reader = Reader(inp)
        head = reader.header()
        if head.get("kind") != KIND or head.get("jname") != jname:
            raise ArchiveError(f"{jname}: not a replication stream of this VM")
        gen, base = int(head["generation"]), head.get("base")
        have = rep.generation if rep is not None else None
        if base is not None and base != have:
            raise StateError(f"{jname}: the stream is based on generation {base}, the replica "
                             f"here is at {have}: ship again (from what is published here)")
        if have is not None and gen <= have:
            raise StateError(f"{jname}: generation {gen} is not newer than the replica's "
                             f"({have})")
        spec = specs.from_untrusted(head["spec"], f"{jname}: the replicated definition")
        tmp = root / f".gen-{gen}.ckp"
        tmp.mkdir(mode=0o700)
        (root / "disks").mkdir(mode=0o700, exist_ok=True)
        store = Store(root / "store")
        store.packs.mkdir(parents=True, exist_ok=True, mode=0o700)
        pack = os.urandom(8).hex()
        pack_tmp = store.packs / f"{TMP_PREFIX}{pack}.pack"
        disks = {str(k): (int(v["size"]), str(v["mode"])) for k, v in head["disks"].items()}
        if any(mode == "delta" for _, mode in disks.values()) and base is None:
            raise ArchiveError(f"{jname}: a disk delta without a base generation")
        for info in reader.members():
            if info.name in (ckpstore.MANIFEST, "entries"):
                reader.extract(info, tmp / info.name)
            elif info.name == "chunks":
                reader.extract(info, pack_tmp)
            elif info.name.startswith("disk/") and info.name[5:] in disks:
                reader.extract(info, root / "disks" / f".in-{info.name[5:]}")
            else:
                raise ArchiveError(f"{jname}: the replication stream holds {info.name}")
            failpoint("replica:receiving")
        reader.check_seal()
        reader.end()
        m = ckpstore.read_manifest(tmp)
        # A stream without a base carries every chunk (the owner assumed nothing here):
        # none of the published recipe's may be taken for known, or the pack does not fit.
        recipe = _recipe(store, rep if base is not None else None, tmp / "entries",
                         pack_tmp, pack)
        (tmp / "entries").unlink()
        if m.stream is None or set(m.files) != {RECIPE}:
            raise ArchiveError(f"{jname}: the replicated checkpoint is not a folded one (its "
                               "memory as a chunk recipe, nothing else)")
        store.verify(recipe, m.stream.size, m.stream.xxh3_128)
        data = recipe.to_bytes()
        write_atomic(tmp / RECIPE, data)
        # lazy: a C extension only checksums need; bls imports this module's package
        import xxhash

        m.files = {**m.files, RECIPE: FileEntry(len(data), xxhash.xxh3_128_hexdigest(data))}
        ckpstore.save_manifest(m, tmp)
        fsync_dir(tmp)
        failpoint("replica:memory")
        new_tag = f"{TAG}{gen}"
        for name, (size, mode) in sorted(disks.items()):
            _disk(root / "disks", name, size, mode, new_tag)
        failpoint("replica:disks")
        final = root / f"gen-{gen}.ckp"
        os.rename(tmp, final)
        fsync_dir(root)
        write_atomic(root / PUBLISHED, json.dumps({
            "generation": gen, "source": str(head.get("source")), "taken": time.time(),
            "spec": spec.to_dict(), "stream": m.stream.xxh3_128,
            "images": sorted(disks)}).encode())
        failpoint("replica:published")
        recover(wd, jname)  # the generation before it: its snapshots, folder and chunks
        return {"jname": jname, "generation": gen}


def _recipe(store: Store, rep: Replica | None, entries: Path, pack_tmp: Path,
            pack: str) -> Recipe:
    """The stream's recipe in this store: chunks the published generation has where they
    are, the new ones (in order of first use) in the pack just received, put in place."""
    known: dict[bytes, tuple[str, int, int]] = {}
    if rep is not None:
        known = store._index([Recipe.read(rep.ckdir / RECIPE)])
    raw = entries.read_bytes()
    if len(raw) % ENTRY.size:
        raise ArchiveError("the replication stream's chunk list is truncated")
    at, packs, out, size = 0, [], [], 0
    for digest, length in ENTRY.iter_unpack(raw):
        ref = known.get(digest)
        if ref is None:
            ref = known[digest] = (pack, at, length)
            at += length
        if ref[0] not in packs:
            packs.append(ref[0])
        out.append((digest, packs.index(ref[0]), ref[1], ref[2]))
        size += length
    if at != pack_tmp.stat().st_size:
        raise ArchiveError(f"the replication stream carries {pack_tmp.stat().st_size} bytes "
                           f"of new chunks, its chunk list needs {at} (not based on what "
                           "this replica has)")
    if at:
        os.rename(pack_tmp, store.pack_path(pack))
        fsync_dir(store.packs)
    else:
        pack_tmp.unlink()
    return Recipe(packs, size, out)


def _disk(d: Path, name: str, size: int, mode: str, tag: str) -> None:
    """The received image *name* written over the replica image's active layer (its
    published snapshot untouched), flushed and snapshotted as *tag*. "full": a qcow2 of the
    owner's snapshot, every byte written, then compared; "delta": a qcow2 holding only the
    clusters written since the base generation (core/cluster/delta.py), committed into the
    image (only its allocated clusters are written). An image new here is made under a
    temporary name and put in place once it has its snapshot: an image without the
    published generation's is always one replica.json does not name (recover removes it)."""
    incoming, image = d / f".in-{name}", d / name
    if not incoming.exists():
        raise ArchiveError(f"the replication stream lacks image {name}")
    got = img.check(incoming, f"the replicated image {name}")
    if got.virtual_size != size:
        raise ArchiveError(f"the replicated image {name} is not the disk's size")
    if mode == "delta":
        if not image.exists():
            raise ArchiveError(f"a delta of image {name}, which this replica lacks")
        img.commit_into(incoming, image)
    else:
        if not image.exists():
            image = d / f".new-{name}"  # a leftover dot file: recover removes it
            img.create(image, size)
            image.chmod(0o600)
        img.write_over(incoming, image)
        img.compare(incoming, image)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    img.snapshot_create(image, tag)
    if image != d / name:
        os.rename(image, d / name)
        fsync_dir(d)
    incoming.unlink()


def remove(wd: Workdir, jname: str) -> str:
    """Drop the replica here (the VM stays where it is; its next replication is full)."""
    root = folder(wd, jname)
    if not root.is_dir():
        raise StateError(f"{jname}: no replica of it on this node")
    with held(wd, jname):
        shutil.rmtree(root)
    return f"{jname}: replica removed"


# --- promote ------------------------------------------------------------------------------

def promote(ctx: Context, jname: str) -> str:
    """The published replica as a VM of this node's inventory: its images (at cbsd-rep-G),
    its checkpoint ha-G (memory in the VM's store); the checkpoint's name, to restore. The
    caller holds the cluster's ownership (its guard refuses otherwise). Files are hard-linked
    into place, so a promote cut short leaves the replica whole; run again, it finishes."""
    wd = ctx.workdir
    with held(wd, jname) as root:
        rep = recover(wd, jname)
        if rep is None:
            done = ctx.inventory.get(jname)
            names = sorted(ckpstore.state_name(p) for p, _ in
                           ckpstore.list_states(wd.checkpoints(jname)))
            ha = [n for n in names if n.startswith(NAME) and n[len(NAME):].isdigit()]
            if done is not None and ha:  # promoted already; only the replica's removal left
                shutil.rmtree(root, ignore_errors=True)
                return max(ha, key=lambda n: int(n[len(NAME):]))
            raise StateError(f"{jname}: no replica of it on this node")
        spec = dataclasses.replace(
            specs.from_untrusted(rep.spec, f"{jname}: the replica's definition"),
            jname=jname, ha=False, ha_node="")
        if ctx.inventory.get(jname) is None:
            _register(ctx, rep, spec)
        elif not _registered(wd, rep):
            # another VM of that name: taking it for the promoted one would delete the only
            # current copy (the replica) and point that VM at a checkpoint it lacks
            raise StateError(f"{jname}: a VM of that name is in this node's inventory and is "
                             "not this replica promoted: bremove it first (the replica is kept)")
        tree.set_current(wd, jname, rep.checkpoint)
        # The replica goes, the VM's files stay (links): promoted, and idempotently so.
        os.unlink(root / PUBLISHED)
        fsync_dir(root)
        shutil.rmtree(root, ignore_errors=True)
        return rep.checkpoint


def _registered(wd: Workdir, rep: Replica) -> bool:
    """Whether the VM of the replica's name here is this replica promoted (a promote cut
    short after _register): its checkpoint ha-G's recipe and every image of it are the
    replica's own files (hard links: the same inodes), which nothing else makes."""
    def same(a: Path, b: Path) -> bool:
        try:
            sa, sb = a.stat(), b.stat()
        except FileNotFoundError:
            return False
        return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)

    ckdir = wd.checkpoint(rep.jname, rep.checkpoint)
    return same(ckdir / RECIPE, rep.ckdir / RECIPE) and all(
        same(wd.vm_dir(rep.jname) / image.name, image) for image in _images(rep.root))


def _register(ctx: Context, rep: Replica, spec: VMSpec) -> None:
    wd, jname = ctx.workdir, spec.jname
    staged = rep.root / f".promote-{rep.generation}.ckp"
    remove_tree(staged)
    staged.mkdir(mode=0o700)
    m = ckpstore.read_manifest(rep.ckdir)
    for f in m.files:
        os.link(rep.ckdir / f, staged / f)
    m.disk_snapshots = [DiskSnapshot(s.disk, rep.tag) for s in m.disk_snapshots]
    ckpstore.save_manifest(m, staged)
    fsync_dir(staged)
    failpoint("replica:promoting")

    def make(vm_dir: Path) -> None:
        for image in _images(rep.root):
            os.link(image, vm_dir / image.name)
        fsync_dir(vm_dir)
        packs = rep.root / "store" / "packs"
        dst = wd.store(jname) / "packs"
        dst.mkdir(parents=True, mode=0o700)
        for p in packs.iterdir() if packs.is_dir() else ():
            if not p.name.startswith("."):
                os.link(p, dst / p.name)
        fsync_dir(dst)
        if spec.cloud_init:
            cloudinit.write_seed(wd.seed(jname), cloudinit.documents(jname, spec.cloud_init))
        wd.checkpoints(jname).mkdir(mode=0o700, exist_ok=True)
        os.rename(staged, wd.checkpoint(jname, rep.checkpoint))
        fsync_dir(wd.checkpoints(jname))

    try:
        lifecycle.create_from(ctx, spec, make)
    except CheckpointError:
        remove_tree(staged)
        raise
