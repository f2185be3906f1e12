"""A per-VM deduplicating store for memory streams, where files cannot be cloned (ext4).

Checkpoints of a VM whose RAM changes little repeat most of their stream. Once a checkpoint is
safely published, a background helper (core/checkpoint/fold.py) cuts its `memory` stream
into content-defined chunks (FastCDC, ~16 KiB: the stream's page headers and 9-byte zero
pages shift every offset, so fixed-size chunks would never match), stores each chunk it has
not stored before, and replaces `memory` by `memory.recipe`: the stream as a list of chunk
references.

    jails-system/<jname>/store/
        packs/<id>.pack          chunk data, appended by one fold, never rewritten; ranges no
                                 recipe references are punched out (fallocate), a pack no
                                 recipe references is deleted
        packs/.tmp-<id>.pack     a fold in progress (only the VM's lock holder writes one)
        .dirty                   a fold or a delete may have left unreferenced data: the next
                                 command holding the VM's lock collects it
    <name>.ckp/memory.recipe     MAGIC, one JSON line (packs, stream size), then ENTRY records

Integrity: each entry carries its chunk's XXH3-128, the recipe's own checksum is in the sealed
manifest, and the manifest keeps the whole stream's size and checksum (`stream`), so a restore
or `mode=verify` checks every chunk and the stream they make. A kill -9 anywhere leaves no
dangling reference: a recipe is written only after the pack it references is flushed and in
place, and garbage is collected only from what no published recipe references.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import json
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbsd.errors import CheckpointError
from cbsd.storage.atomic import created, fsync_dir

SLOW_NOTICE = ("cbsd: notice: the chunk store is chunking with fastcdc's pure-Python fallback "
               "(~100x slower; same chunks): its C accelerator is not built for this Python "
               "(run scripts/setup.sh, which installs what it needs)")
_said_slow = False


def _chunker() -> Callable[..., Iterator[Any]]:
    """fastcdc's chunker. Its C accelerator and its pure-Python fallback cut the same chunks,
    but the fallback (a Python without a wheel, installed where no compiler was) is ~100x
    slower: that is said once per process, on stderr (fastcdc's own notice goes to stdout,
    where a command's output is: it is kept out of there)."""
    global _said_slow
    with contextlib.redirect_stdout(io.StringIO()):
        # lazy: fastcdc costs ~30 ms (it loads click): only a save, fold or copy chunks
        from fastcdc import fastcdc
    if not _said_slow and not native_chunker():
        _said_slow = True
        print(SLOW_NOTICE, file=sys.stderr, flush=True)
    return fastcdc  # type: ignore[no-any-return]


def native_chunker() -> bool:
    """Whether fastcdc runs its C accelerator (scripts/setup.sh checks this after install)."""
    with contextlib.redirect_stdout(io.StringIO()):
        # lazy: fastcdc costs ~30 ms (it loads click): only a save, fold or copy chunks
        from fastcdc import fastcdc
    return getattr(fastcdc, "__module__", "") == "fastcdc.fastcdc_cy"


def accelerator_installed() -> bool:
    """native_chunker() without importing fastcdc (~30 ms: it loads click): whether its C
    accelerator is built for this Python. For a command that starts a detached fold, whose
    stderr no one reads: the command says it instead (core/checkpoint/fold.start_helper)."""
    spec = importlib.util.find_spec("fastcdc")  # finds the package, runs none of it
    where = spec.submodule_search_locations if spec else None
    return any(Path(d, "fastcdc_cy" + suffix).is_file() for d in where or ()
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


RECIPE = "memory.recipe"
MAGIC = b"CBSD-RECIPE-1\n"
ENTRY = struct.Struct("<16sHQI")  # chunk digest (xxh3-128), pack index, offset, length
MIN_CHUNK, AVG_CHUNK, MAX_CHUNK = 8 << 10, 16 << 10, 64 << 10
RUN_MAX = 1 << 20  # bytes read at once when a stream is read back
DIRTY = ".dirty"
TMP_PREFIX = ".tmp-"


@dataclass
class Recipe:
    packs: list[str]  # pack ids
    size: int  # the stream's length
    entries: list[tuple[bytes, int, int, int]]

    def to_bytes(self) -> bytes:
        head = json.dumps({"packs": self.packs, "size": self.size,
                           "count": len(self.entries)}).encode()
        return MAGIC + head + b"\n" + b"".join(ENTRY.pack(*e) for e in self.entries)

    @classmethod
    def read(cls, path: Path) -> Recipe:
        data = path.read_bytes()
        if not data.startswith(MAGIC):
            raise CheckpointError(f"{path.name} is not a chunk recipe")
        try:  # damaged anywhere: one CheckpointError, never a parser's own exception
            end = data.index(b"\n", len(MAGIC))
            head = json.loads(data[len(MAGIC):end])
            body = memoryview(data)[end + 1:]
            if len(body) != head["count"] * ENTRY.size:
                raise CheckpointError(f"{path.name} is truncated")
            return cls([str(p) for p in head["packs"]], int(head["size"]),
                       list(ENTRY.iter_unpack(body)))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{path.name} is damaged (unreadable)") from None


class Yielded(Exception):
    """A fold gave way to a command that needs the VM (it is retried later)."""


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.packs = root / "packs"

    def pack_path(self, pack: str) -> Path:
        return self.packs / f"{pack}.pack"

    # --- folding a stream into the store ----------------------------------------------------

    def fold(self, stream: Path, recipes: Iterable[Recipe],
             should_yield: Callable[[], bool] = lambda: False) -> tuple[Recipe, str]:
        """Cut *stream* into chunks, append the new ones to a new pack, and return its recipe
        and the XXH3-128 of the stream as read (the pack is flushed and in place; the caller
        then publishes the recipe). Chunks the given recipes hold are referenced, not stored
        again. Yielded if *should_yield* says so (the unfinished pack is removed)."""
        # lazy: a fold maps its file; bls and most commands import this module
        import mmap

        # lazy: a C extension only chunk writes and checks need; bls imports this module
        import xxhash

        fastcdc = _chunker()
        known = self._index(recipes)
        self.packs.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / DIRTY).touch(mode=0o600)  # from here a kill may leave an orphan pack
        pack = os.urandom(8).hex()
        tmp = self.packs / f"{TMP_PREFIX}{pack}.pack"
        packs: list[str] = []
        entries: list[tuple[bytes, int, int, int]] = []
        written = 0
        whole = xxhash.xxh3_128()
        with created(tmp) as fd, open(stream, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if size else None
            view = memoryview(mm) if mm is not None else memoryview(b"")
            cuts = fastcdc(mm, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) if mm is not None else ()
            try:
                for i, c in enumerate(cuts):
                    if i % 64 == 0 and should_yield():
                        raise Yielded
                    data = view[c.offset:c.offset + c.length]
                    whole.update(data)
                    digest = xxhash.xxh3_128_digest(data)
                    ref = known.get(digest)
                    if ref is None:
                        os.write(fd, data)
                        ref = (pack, written, c.length)
                        known[digest] = ref
                        written += c.length
                    if ref[0] not in packs:
                        packs.append(ref[0])
                    entries.append((digest, packs.index(ref[0]), ref[1], ref[2]))
            finally:
                # Not closed by hand: the chunker and the slices hold the mapping's buffer
                # until they are gone; the mapping goes with the last of them.
                del cuts, view, mm
        if written:
            os.rename(tmp, self.pack_path(pack))
            fsync_dir(self.packs)
        else:
            tmp.unlink()
        return Recipe(packs, size, entries), whole.hexdigest()

    @staticmethod
    def _index(recipes: Iterable[Recipe]) -> dict[bytes, tuple[str, int, int]]:
        known: dict[bytes, tuple[str, int, int]] = {}
        for r in recipes:
            for digest, pack, offset, length in r.entries:
                known.setdefault(digest, (r.packs[pack], offset, length))
        return known

    # --- reading a stream back --------------------------------------------------------------

    def runs(self, recipe: Recipe, fds: dict[int, int]
             ) -> Iterator[tuple[int, int, list[tuple[int, bytes]]]]:
        """(pack fd, offset, [(length, digest), ...]) for runs of chunks that lie one after
        another in one pack, at most RUN_MAX bytes each, in stream order: a fresh stream's
        chunks, and most of a later one's, are read back in large pieces. Packs are opened
        into *fds* (pack index -> fd), which the caller closes (_closing)."""
        run_fd, start, run_len = -1, 0, 0
        parts: list[tuple[int, bytes]] = []
        for digest, pack, offset, length in recipe.entries:
            fd = fds.get(pack)
            if fd is None:
                fd = fds[pack] = self._open_pack(recipe, pack)
            if fd == run_fd and start + run_len == offset and run_len + length <= RUN_MAX:
                run_len += length
                parts.append((length, digest))
                continue
            if parts:
                yield run_fd, start, parts
            run_fd, start, run_len, parts = fd, offset, length, [(length, digest)]
        if parts:
            yield run_fd, start, parts

    def _open_pack(self, recipe: Recipe, pack: int) -> int:
        try:
            return os.open(self.pack_path(recipe.packs[pack]), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, IndexError):
            name = recipe.packs[pack] if pack < len(recipe.packs) else f"#{pack}"
            raise CheckpointError(f"chunk pack {name} is missing") from None

    def checked(self, recipe: Recipe, size: int, fds: dict[int, int]
                ) -> Iterator[tuple[int, int, bytes]]:
        """(pack fd, offset, data) of the stream, run by run, each run's chunks checked
        against their digests before it is handed out (the recipe's own checksum is the
        caller's: the manifest has it)."""
        # lazy: a C extension only chunk writes and checks need; bls imports this module
        import xxhash

        total = 0
        for fd, offset, parts in self.runs(recipe, fds):
            length = sum(n for n, _ in parts)
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise CheckpointError(f"a chunk pack ends before stream offset "
                                      f"{total + length} (the store is damaged)")
            view, at = memoryview(data), 0
            for n, digest in parts:
                if xxhash.xxh3_128_digest(view[at:at + n]) != digest:
                    raise CheckpointError(f"a chunk at stream offset {total + at} does not "
                                          "match its checksum (the store is damaged)")
                at += n
            total += length
            yield fd, offset, data
        if total != size:
            raise CheckpointError(f"the chunks make {total} bytes, the stream saved had {size}")

    def verify(self, recipe: Recipe, size: int, xxh3_128: str,
               should_yield: Callable[[], bool] = lambda: False) -> None:
        """Every chunk matches its digest and together they are the stream that was saved.
        Yielded if *should_yield* says so (asked every 16 MiB or so)."""
        # lazy: a C extension only chunk writes and checks need; bls imports this module
        import xxhash

        whole = xxhash.xxh3_128()
        with _closing() as fds:
            for i, (_, _, data) in enumerate(self.checked(recipe, size, fds)):
                if i % 16 == 0 and should_yield():
                    raise Yielded
                whole.update(data)
        if whole.hexdigest() != xxh3_128:
            raise CheckpointError("the stream rebuilt from its chunks does not match the one "
                                  "saved")

    def read_back(self, recipe: Recipe, xxh3_128: str,
                  should_yield: Callable[[], bool] = lambda: False) -> None:
        """After a fold, before its stream is deleted: check that the recipe rebuilds the
        stream (verify), then read its chunks once more. The second read is for the page
        cache: a page written and read once stays on the kernel's inactive list and goes
        first under memory pressure, while the stream it replaces had been read twice (by
        its checksum and by the fold) and was on the active list. Measured here with 3 GiB
        files and 13 GiB taken: written + read once, 0.9 GiB stayed cached; read twice, all
        of it (docs/benchmarks/analysis.md, "Checkpoint engine v2")."""
        self.verify(recipe, recipe.size, xxh3_128, should_yield)
        buf = memoryview(bytearray(RUN_MAX))
        with _closing() as fds:
            for i, (fd, offset, parts) in enumerate(self.runs(recipe, fds)):
                if i % 16 == 0 and should_yield():
                    raise Yielded
                os.preadv(fd, [buf[:sum(n for n, _ in parts)]], offset)

    def feed(self, recipe: Recipe, size: int, out: int, progress: list[int],
             before_last: Callable[[], None]) -> None:
        """Write the stream into *out* (a pipe QEMU loads from); progress[0] counts the bytes
        written. QEMU never gets a byte that was not checked: each run is read and checked,
        then moved from the page cache with splice(2) (a copy through Python measured twice
        as slow), one run behind. *before_last* is called once every chunk is checked, before
        the last run is written (QEMU cannot finish loading before: a restore reverts the
        disks there, once the whole state is known good)."""
        pending: tuple[int, int, int] | None = None
        with _closing() as fds:
            for fd, offset, data in self.checked(recipe, size, fds):
                if pending is not None:
                    _splice_all(*pending, out, progress)
                pending = fd, offset, len(data)
            before_last()
            if pending is not None:
                _splice_all(*pending, out, progress)

    def rebuild(self, recipe: Recipe, dst: Path) -> None:
        """Write the stream back out as a plain file *dst* (owner-only, flushed), checking
        every chunk on the way."""
        with created(dst) as fd, _closing() as fds:
            for _, _, data in self.checked(recipe, recipe.size, fds):
                os.write(fd, data)

    # --- collecting garbage -----------------------------------------------------------------

    def collect(self, recipes: Iterable[Recipe]) -> int:
        """Free what no published recipe references (caller holds the VM's lock, so no fold
        runs): orphaned temporary packs, whole packs, and the dead ranges inside live packs
        (punched out, so the pack keeps its offsets). Returns the bytes freed."""
        live: dict[str, list[tuple[int, int]]] = {}
        for r in recipes:
            for _, index, offset, length in r.entries:
                live.setdefault(r.packs[index], []).append((offset, offset + length))
        freed = 0
        try:
            entries = list(os.scandir(self.packs))
        except FileNotFoundError:
            entries = []
        for e in entries:
            if not e.name.endswith(".pack"):
                continue
            pack_id = e.name.removesuffix(".pack")
            st = e.stat(follow_symlinks=False)
            if pack_id.startswith(TMP_PREFIX) or pack_id not in live:
                os.unlink(e.path)
                freed += st.st_blocks * 512
                continue
            freed += _punch_dead(e.path, live[pack_id], st.st_size)
        with contextlib.suppress(FileNotFoundError):
            (self.root / DIRTY).unlink()
        return freed

    def dirty(self) -> bool:
        return (self.root / DIRTY).exists()

    def mark_dirty(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / DIRTY).touch(mode=0o600)


@contextlib.contextmanager
def _closing() -> Iterator[dict[int, int]]:
    fds: dict[int, int] = {}
    try:
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def _splice_all(src: int, offset: int, length: int, out: int, progress: list[int]) -> None:
    end = offset + length
    while offset < end:
        n = os.splice(src, out, end - offset, offset_src=offset)
        if n == 0:
            raise CheckpointError("a chunk pack ended early (the store is damaged)")
        offset += n
        progress[0] += n


def _punch_dead(path: str, ranges: list[tuple[int, int]], size: int) -> int:
    """Punch holes where no live range is (whole 4 KiB blocks only); returns bytes punched."""
    # lazy: ctypes is heavy; only punching holes in a pack file needs it
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    falloc = libc.fallocate
    falloc.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    block = 4096
    punched = 0
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        pos = 0
        for start, end in [*sorted(ranges), (size, size)]:
            lo = -(-pos // block) * block  # round the gap inwards to whole blocks
            hi = start // block * block
            if hi > lo and falloc(fd, punch, lo, hi - lo) == 0:
                punched += hi - lo
            pos = max(pos, end)
    finally:
        os.close(fd)
    return punched
