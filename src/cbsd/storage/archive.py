"""The export archive (docs/many-hosts.md, "Archive format"): one POSIX tar stream, so it can
go through a pipe or ssh and be read with `tar tvf`, whose every member is checksummed.

    cbsd-export.json     first: the header (format, the VM's definition, what the source host
                         ran, and the name and size of every member that follows)
    vm/FILE              the VM's folder: disks, cloud-init seed, UEFI variable store
    boot/kernel|initrd|iso   boot media the definition names by path (restored beside the disks)
    checkpoints/NAME.ckp/FILE, hibernate.ckp/FILE   saved states, each with its own sealed
                         manifest (a folded stream travels as a plain `memory`)
    cbsd-export.seal     last: size and XXH3-128 of the header and of every member, sealed
                         with its own checksum

The reader checks each member against the header while it streams it to disk and the seal at
the end, so a damaged, truncated, reordered or hand-edited archive is refused; the checksums
are XXH3 (integrity, not authenticity: who may send an archive is SSH's business).
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cbsd.errors import ArchiveError, CbsdError

HEADER = "cbsd-export.json"
SEAL = "cbsd-export.seal"
FORMAT = 1
BUF = 1 << 20
HEADER_MAX = 16 << 20


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sealed(body: dict[str, Any]) -> bytes:
    import xxhash

    return json.dumps({**body, "seal_checksum": xxhash.xxh3_128_hexdigest(canonical(body))},
                      sort_keys=True, indent=1).encode()


def unseal(data: bytes, what: str) -> dict[str, Any]:
    import xxhash

    try:
        body = json.loads(data)
        check = body.pop("seal_checksum")
    except (ValueError, KeyError, AttributeError, TypeError):
        raise ArchiveError(f"the archive's {what} is unreadable") from None
    if not isinstance(body, dict) or check != xxhash.xxh3_128_hexdigest(canonical(body)):
        raise ArchiveError(f"the archive's {what} was altered (checksum mismatch)")
    return body


@dataclass(frozen=True)
class Source:
    """What one member is made of: a file, or pieces (a stream rebuilt from a chunk store)."""

    size: int
    path: Path | None = None
    pieces: Iterable[bytes] = ()


class Writer:
    """Writes members in order; close() appends the seal. Returns each member's checksum."""

    def __init__(self, out: IO[bytes]) -> None:
        self._tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,  # noqa: SIM115
                                 bufsize=BUF)
        # tarfile's own default copies 16 KiB at a time (typeshed lacks the attribute)
        self._tar.copybufsize = BUF  # type: ignore[attr-defined]
        self.sums: dict[str, list[Any]] = {}

    def add(self, name: str, src: Source) -> str:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = src.size, 0o600, int(time.time())
        reader = _Hashing(src)
        self._tar.addfile(info, reader)  # type: ignore[arg-type]
        if reader.count != src.size:
            raise CbsdError(f"{name} changed size while it was exported")
        digest = reader.hexdigest()
        self.sums[name] = [src.size, digest]
        return digest

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add(name, Source(len(data), pieces=(data,)))

    def close(self) -> None:
        self.add_bytes(SEAL, sealed({"format": FORMAT, "members": self.sums}))
        self._tar.close()

    def abandon(self) -> None:
        """After a failure: write nothing more (no end-of-archive: the reader will see a
        truncated archive, never a complete-looking one)."""
        self._tar.fileobj.closed = True  # type: ignore[attr-defined]
        self._tar.closed = True  # type: ignore[attr-defined]


class _Hashing:
    """A file object for tarfile.addfile that hashes what it hands out."""

    def __init__(self, src: Source) -> None:
        import xxhash

        self._h = xxhash.xxh3_128()
        self.count = 0
        self._file = open(src.path, "rb") if src.path is not None else None  # noqa: SIM115
        self._pieces: Iterator[bytes] = iter(src.pieces)
        self._left = memoryview(b"")

    def read(self, n: int) -> bytes:
        """Up to *n* bytes, fewer only at the end (tarfile takes a short read for one)."""
        if self._file is not None:
            data = self._file.read(n)
        else:
            out = bytearray()
            while len(out) < n:
                if not self._left:
                    piece = next(self._pieces, None)
                    if piece is None:
                        break
                    self._left = memoryview(piece)
                take = self._left[:n - len(out)]
                out += take
                self._left = self._left[len(take):]
            data = bytes(out)
        self._h.update(data)
        self.count += len(data)
        return data

    def hexdigest(self) -> str:
        if self._file is not None:
            self._file.close()
        return str(self._h.hexdigest())


class Reader:
    """Reads the header, then each member into a file, then checks the seal."""

    def __init__(self, inp: IO[bytes]) -> None:
        try:
            self._tar = tarfile.open(fileobj=inp, mode="r|", bufsize=BUF)  # noqa: SIM115
        except tarfile.TarError as e:
            raise ArchiveError(f"not a cbsd export archive ({e})") from None
        self._members = iter(self._tar)
        self.sums: dict[str, list[Any]] = {}

    def _next(self) -> tarfile.TarInfo | None:
        try:
            return next(self._members, None)
        except (tarfile.TarError, EOFError) as e:
            raise ArchiveError(f"the archive is damaged or truncated ({e})") from None

    def header(self) -> dict[str, Any]:
        info = self._next()
        if info is None or info.name != HEADER or not info.isfile() or \
                info.size > HEADER_MAX:
            raise ArchiveError("not a cbsd export archive (it does not begin with "
                               f"{HEADER})")
        data = self._read_all(info)
        try:
            head = json.loads(data)
        except ValueError:
            raise ArchiveError(f"the archive's {HEADER} is unreadable") from None
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise ArchiveError(f"the archive has format {head.get('format')!r}; this cbsd "
                               f"reads format {FORMAT} (a newer cbsd wrote it?)")
        return head

    def members(self) -> Iterator[tarfile.TarInfo]:
        """Every member up to the seal (which is read and kept, not handed out)."""
        while True:
            info = self._next()
            if info is None:
                raise ArchiveError("the archive is truncated (it ends before its seal)")
            if info.name == SEAL:
                self._seal = unseal(self._read_all(info), "seal")
                if self._next() is not None:
                    raise ArchiveError("the archive has members after its seal")
                return
            if not info.isfile():
                raise ArchiveError(f"the archive holds {info.name}, which is not a file")
            yield info

    def _read_all(self, info: tarfile.TarInfo) -> bytes:
        import xxhash

        f = self._tar.extractfile(info)
        assert f is not None
        try:
            data = f.read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ArchiveError(f"the archive is damaged or truncated ({e})") from None
        if len(data) != info.size:
            raise ArchiveError("the archive is truncated")
        self.sums[info.name] = [info.size, xxhash.xxh3_128_hexdigest(data)]
        return data

    def extract(self, info: tarfile.TarInfo, dst: Path) -> None:
        """Write the member to *dst* (new, owner-only), leaving holes for runs of zeros."""
        import xxhash

        h = xxhash.xxh3_128()
        f = self._tar.extractfile(info)
        assert f is not None
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        total = 0
        try:
            zeros = bytes(BUF)
            while True:
                try:
                    data = f.read(BUF)
                except (tarfile.TarError, EOFError) as e:
                    raise ArchiveError(f"the archive is damaged or truncated ({e})") from None
                if not data:
                    break
                h.update(data)
                if len(data) == BUF and data == zeros:
                    os.lseek(fd, BUF, os.SEEK_CUR)
                else:
                    _write_all(fd, data)
                total += len(data)
            if total != info.size:
                raise ArchiveError(f"the archive is truncated (in {info.name})")
            os.ftruncate(fd, total)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.sums[info.name] = [total, h.hexdigest()]

    def check_seal(self) -> None:
        """Every member read matches the seal and the seal names no other."""
        members = self._seal.get("members")
        if not isinstance(members, dict):
            raise ArchiveError("the archive's seal is unreadable")
        for name, got in self.sums.items():
            if name == SEAL:
                continue
            if members.get(name) != got:
                raise ArchiveError(f"{name} in the archive does not match its checksum "
                                   "(damaged or altered)")
        missing = set(members) - set(self.sums)
        if missing:
            raise ArchiveError(f"the archive lacks {', '.join(sorted(missing))}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
