"""The on-disk format of a saved VM state (a checkpoint, or the hibernation image).

    <name>.ckp/                 directory, mode 0700
        memory                  QEMU's migration stream (RAM, CPU and device state), mode 0600
        ram                     only from a VM whose RAM is a file: that file, cloned (reflink);
                                memory then holds CPU and device state only, mode 0600
        manifest.json           what restore needs and the checksums, mode 0600

The manifest carries its own checksum, so a hand-edited manifest is detected too. A state is
written into a hidden temporary directory (.<name>.ckp.tmp-<pid>-<random>) and renamed into place
only once complete, flushed and verified: a directory named <name>.ckp with a valid manifest is
complete, anything else is not listed and is cleared by the next command holding the VM's lock.
Disk state lives in the VM's qcow2 images as internal snapshots named in the manifest.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

from cbsd.errors import CheckpointError
from cbsd.failpoints import failpoint
from cbsd.storage.atomic import fsync_dir, remove_tree, write_atomic
from cbsd.storage.chunkstore import RECIPE, Recipe, Store
from cbsd.storage.manifest import FORMAT, MEMORY, RAM, Manifest
from cbsd.storage.paths import HIBERNATION_DIR

MANIFEST = "manifest.json"
SUFFIX = ".ckp"
CHUNK = 8 << 20


def digest_file(path: Path) -> tuple[int, str]:
    """(size, xxh3-128 hex) of a file: fast enough (>5 GB/s) to check before every restore.

    Mapped, not read: hashing straight from the page cache skips copying every byte into a
    buffer first (~0.05 s per GiB here). Holes (a mapped-ram stream is a sparse file the size
    of RAM) are hashed as the zeros they read as, without faulting in a page for each.
    Saved states are only read under the VM's lock, so the file cannot shrink under the
    mapping."""
    # lazy: only hashing a file maps it; bls and most commands import this module
    import mmap

    # lazy: a C extension only sealing and hashing need; bls imports this module
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        if not size:
            return 0, h.hexdigest()
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mapped:
            view = memoryview(mapped)
            try:
                pos = 0
                while pos < size:
                    try:
                        data = os.lseek(fd, pos, os.SEEK_DATA)
                    except OSError as e:
                        if e.errno != errno.ENXIO:
                            raise
                        data = size  # only a hole is left
                    while pos < data:
                        n = min(CHUNK, data - pos)
                        h.update(_ZEROS[:n])
                        pos += n
                    end = os.lseek(fd, pos, os.SEEK_HOLE) if pos < size else size
                    for offset in range(pos, end, CHUNK):
                        h.update(view[offset:min(offset + CHUNK, end)])
                    pos = end
            finally:
                view.release()
    return size, h.hexdigest()


_ZEROS = memoryview(bytes(CHUNK))


def _seal(body: dict[str, Any]) -> dict[str, Any]:
    # lazy: a C extension only sealing and hashing need; bls imports this module
    import xxhash

    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return {**body, "manifest_checksum": xxhash.xxh3_128_hexdigest(canon)}


def manifest_bytes(manifest: Manifest) -> bytes:
    """*manifest* as stored: JSON sealed with its own checksum."""
    return json.dumps(_seal(manifest.to_json()), indent=1, sort_keys=True).encode()


def save_manifest(manifest: Manifest, ckdir: Path) -> None:
    """Write *manifest* sealed with its own checksum into *ckdir* (atomically)."""
    write_atomic(ckdir / MANIFEST, manifest_bytes(manifest))


def describe(ckdir: Path) -> str:
    """How errors name a saved state: 'checkpoint NAME' or 'hibernation image'."""
    if ckdir.name == HIBERNATION_DIR:
        return "hibernation image"
    return f"checkpoint {state_name(ckdir)}"


def read_manifest(ckdir: Path) -> Manifest:
    """Parse and check the manifest's own checksum; CheckpointError if absent or damaged."""
    name = describe(ckdir)
    try:
        data = json.loads((ckdir / MANIFEST).read_bytes())
        sealed = _seal({k: v for k, v in data.items() if k != "manifest_checksum"})
    except FileNotFoundError:
        raise CheckpointError(f"{name} is damaged: its manifest is missing") from None
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{name} is damaged: unreadable manifest ({e})") from e
    if data.get("manifest_checksum") != sealed["manifest_checksum"]:
        raise CheckpointError(f"{name} is damaged: its manifest was altered "
                              "(checksum mismatch)")
    try:
        return Manifest.from_json(data)
    except ValueError as e:
        raise CheckpointError(f"{name} cannot be read: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{name} is damaged: its manifest lacks {e}") from None


def check_files(ckdir: Path, manifest: Manifest) -> None:
    """Every file the manifest lists is there with its size (cheap: no data is read)."""
    what = describe(ckdir)
    for fname, meta in manifest.files.items():
        path = ckdir / fname
        if not path.is_file() or path.is_symlink():
            raise CheckpointError(f"{what} is damaged: {fname} is missing")
        size = path.stat().st_size
        if size != meta.size:
            raise CheckpointError(f"{what} is damaged: {fname} has {size} "
                                  f"bytes, expected {meta.size} (truncated?)")


def verify_checksums(ckdir: Path, manifest: Manifest,
                     skip: frozenset[str] = frozenset(), *, chunks: bool = True) -> None:
    """Every file's content (but those in *skip*) matches the manifest's checksum; a stream
    folded into the chunk store is rebuilt and checked chunk by chunk (unless not *chunks*:
    a restore checks them as it feeds them to QEMU)."""
    for fname, meta in manifest.files.items():
        if fname in skip:
            continue
        size, digest = digest_file(ckdir / fname)
        if size != meta.size or digest != meta.xxh3_128:
            raise CheckpointError(f"{describe(ckdir)} is damaged: {fname} checksum mismatch")
    if manifest.stream is not None and chunks:
        try:
            Store(store_of(ckdir)).verify(Recipe.read(ckdir / RECIPE), manifest.stream.size,
                                          manifest.stream.xxh3_128)
        except CheckpointError as e:
            raise CheckpointError(f"{describe(ckdir)} is damaged: {e}") from None


def store_of(ckdir: Path) -> Path:
    """The chunk store of the VM a saved state belongs to: jails-system/<jname>/store (a
    checkpoint lies in jails-system/<jname>/checkpoints/, the hibernation image beside it)."""
    system = ckdir.parent.parent if ckdir.parent.name == "checkpoints" else ckdir.parent
    return system / "store"


def recipes(system: Path) -> list[Recipe] | None:
    """Every chunk recipe a state of the VM holds (published, damaged or pending: a recipe
    present counts, whatever its manifest says), or None if one cannot be read: then nothing
    may be collected, since what it references is unknown."""
    out: list[Recipe] = []
    dirs = [p for p, _ in list_states(system / "checkpoints")] + [system / HIBERNATION_DIR]
    for d in dirs:
        path = d / RECIPE
        if not path.exists():
            continue
        try:
            out.append(Recipe.read(path))
        except (OSError, ValueError, KeyError, CheckpointError):
            return None
    return out


def verify_files(ckdir: Path, manifest: Manifest) -> None:
    check_files(ckdir, manifest)
    verify_checksums(ckdir, manifest)


def has_manifest(ckdir: Path) -> bool:
    """Cheap presence test (for status): a published state with a manifest."""
    return (ckdir / MANIFEST).is_file()


def state_name(path: Path) -> str:
    """'NAME.ckp' -> 'NAME'; also for a replaced state awaiting recovery ('.NAME.ckp.old-x')."""
    name = path.name
    if name.startswith(".") and ".ckp.old-" in name:
        name = name[1:].split(".old-")[0]
    return name.removesuffix(SUFFIX)


def count_states(directory: Path) -> int:
    """How many published states *directory* holds, by their names alone (no manifest read:
    the API's list counts every VM's checkpoints at bls's speed)."""
    try:
        return sum(1 for e in os.scandir(directory)
                   if not e.name.startswith(".") and e.name.endswith(SUFFIX))
    except FileNotFoundError:
        return 0


def list_states(directory: Path) -> list[tuple[Path, Manifest | None]]:
    """Published states, oldest first; a damaged one is listed with manifest None. A state whose
    replacement was interrupted between its two renames is listed under its own name: that is
    what recovery will restore."""
    out: list[tuple[float, str, Path, Manifest | None]] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    names = {e.name for e in entries}
    for e in entries:
        pending_old = (e.name.startswith(".") and ".ckp.old-" in e.name
                       and f"{state_name(Path(e.name))}{SUFFIX}" not in names)
        if not pending_old and (e.name.startswith(".") or not e.name.endswith(SUFFIX)):
            continue
        if not e.is_dir(follow_symlinks=False):
            continue
        p = Path(e.path)
        try:
            manifest = read_manifest(p)
            out.append((manifest.created_ts, e.name, p, manifest))
        except CheckpointError:
            try:
                mtime = e.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue  # deleted while we listed (a concurrent destroy): not a state now
            out.append((mtime, e.name, p, None))
    out.sort(key=lambda t: (t[0], t[1]))
    return [(p, m) for _, _, p, m in out]


def _hidden(final: Path, role: str) -> Path:
    """A name beside *final* that listings never show and recover() recognises by *role*."""
    return final.with_name(f".{final.name}.{role}-{os.urandom(4).hex()}")


def new_tmpdir(final: Path) -> Path:
    tmp = _hidden(final, f"tmp-{os.getpid()}")
    tmp.mkdir(mode=0o700)
    return tmp


def publish(tmp: Path, final: Path) -> Path | None:
    """Move a complete state into place. Returns the replaced old state's new path, if any
    (the caller deletes it, and its disk snapshots, once the new one is in place)."""
    old = None
    if final.exists():
        old = _hidden(final, "old")
        os.rename(final, old)
        failpoint("publish:old-renamed")
    os.rename(tmp, final)
    fsync_dir(final.parent)
    return old


def leftovers(directory: Path) -> tuple[list[Path], list[Path]]:
    """(temporary dirs, replaced-old dirs) left by an interrupted command."""
    tmps, olds = [], []
    try:
        for e in os.scandir(directory):
            if e.name.startswith(".") and (".ckp.tmp-" in e.name or ".ckp.del-" in e.name):
                tmps.append(Path(e.path))
            elif e.name.startswith(".") and ".ckp.old-" in e.name:
                olds.append(Path(e.path))
    except FileNotFoundError:
        pass
    return tmps, olds


def settle(directory: Path) -> list[Path]:
    """Finish or undo an interrupted publish; returns the directories that must be deleted
    (after their disk snapshots are released by the caller)."""
    tmps, olds = leftovers(directory)
    doomed = list(tmps)
    for old in olds:
        final = directory / old.name[1:].split(".old-")[0]
        if not final.exists():
            os.rename(old, final)  # crashed between the two renames: the old one stays current
        else:
            doomed.append(old)
    return doomed


def retire(final: Path) -> Path:
    """First step of deleting a state: hide it under a name that recovery always deletes."""
    doomed = _hidden(final, "del")
    os.rename(final, doomed)
    fsync_dir(final.parent)
    return doomed


def now_iso() -> tuple[str, float]:
    ts = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z", ts


__all__ = [
    "FORMAT",
    "MEMORY",
    "RAM",
    "RECIPE",
    "Manifest",
    "digest_file",
    "has_manifest",
    "list_states",
    "new_tmpdir",
    "now_iso",
    "publish",
    "read_manifest",
    "remove_tree",
    "retire",
    "save_manifest",
    "settle",
    "state_name",
    "verify_files",
]
