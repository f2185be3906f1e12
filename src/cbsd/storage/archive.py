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

import xxhash

from cbsd.errors import ArchiveError, CbsdError
from cbsd.storage.atomic import created

HEADER = "cbsd-export.json"
SEAL = "cbsd-export.seal"
FORMAT = 1
BUF = 1 << 20
BLOCK = tarfile.BLOCKSIZE
HEADER_MAX = 16 << 20
PAX_MAX = 1 << 20  # a pax header cbsd writes holds a path and a size: far under this


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sealed(body: dict[str, Any]) -> bytes:
    return json.dumps({**body, "seal_checksum": xxhash.xxh3_128_hexdigest(canonical(body))},
                      sort_keys=True, indent=1).encode()


def unseal(data: bytes, what: str) -> dict[str, Any]:
    try:
        body = json.loads(data)
        check = body.pop("seal_checksum")
    except (ValueError, KeyError, AttributeError, TypeError, RecursionError):
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
    """Writes members in order; close() appends the seal. Tar headers come from tarfile
    (TarInfo.tobuf, pax where ustar cannot hold a field); the data is written straight from
    one reused buffer (tarfile's stream mode copies every byte three times more)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._buf = bytearray(BUF)
        self.sums: dict[str, list[Any]] = {}

    def add(self, name: str, src: Source) -> str:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = src.size, 0o600, int(time.time())
        self._out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        h, count = xxhash.xxh3_128(), 0
        for chunk in self._chunks(src):
            h.update(chunk)
            self._out.write(chunk)
            count += len(chunk)
        if count != src.size:
            raise CbsdError(f"{name} changed size while it was exported")
        self._out.write(bytes(-count % BLOCK))
        digest = str(h.hexdigest())
        self.sums[name] = [src.size, digest]
        return digest

    def _chunks(self, src: Source) -> Iterator[memoryview | bytes]:
        if src.path is None:
            yield from src.pieces
            return
        view = memoryview(self._buf)
        with open(src.path, "rb", buffering=0) as f:
            while n := f.readinto(self._buf):
                yield view[:n]

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add(name, Source(len(data), pieces=(data,)))

    def close(self) -> None:
        """The seal, then tar's end (two zero blocks, padded to a whole record)."""
        self.add_bytes(SEAL, sealed({"format": FORMAT, "members": self.sums}))
        self._out.write(bytes(tarfile.RECORDSIZE))


class Reader:
    """Reads the header, then each member into a file, then checks the seal. Tar headers are
    parsed by tarfile (TarInfo.frombuf, pax records applied); data is read straight into one
    reused buffer."""

    def __init__(self, inp: IO[bytes]) -> None:
        self._in = inp
        self._buf = bytearray(BUF)
        self.sums: dict[str, list[Any]] = {}

    def _read(self, n: int) -> bytes:
        data = self._in.read(n)
        while len(data) < n:
            more = self._in.read(n - len(data))
            if not more:
                raise ArchiveError("the archive is truncated")
            data += more
        return data

    def _next(self) -> tarfile.TarInfo | None:
        """The next member's header (pax records applied), None at the archive's end."""
        pax: dict[str, str] = {}
        while True:
            block = self._in.read(BLOCK)
            if not block:
                return None
            if len(block) < BLOCK:
                block += self._read(BLOCK - len(block))
            if block == bytes(BLOCK):
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.TarError as e:
                raise ArchiveError(f"not a cbsd export archive, or a damaged one ({e})") from None
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                if info.size > PAX_MAX:  # bounded before a byte of it is read
                    raise ArchiveError(f"the archive has a damaged header (a pax header of "
                                       f"{info.size} bytes)")
                records = _pax_records(self._read(info.size + (-info.size % BLOCK))[:info.size])
                if info.type == tarfile.XHDTYPE:
                    pax = records
                continue
            if "path" in pax:
                info.name = pax["path"]
            if "size" in pax:
                try:
                    info.size = int(pax["size"])
                except ValueError:
                    raise ArchiveError("the archive has a damaged header") from None
            return info

    def header(self) -> dict[str, Any]:
        try:
            info = self._next()
        except ArchiveError:
            info = None
        if info is None or info.name != HEADER or not info.isfile() or \
                info.size > HEADER_MAX:
            raise ArchiveError("not a cbsd export archive (it does not begin with "
                               f"{HEADER})")
        data = self._read_all(info)
        try:
            head = json.loads(data)
        except (ValueError, RecursionError):
            raise ArchiveError(f"the archive's {HEADER} is unreadable") from None
        if not isinstance(head, dict):
            raise ArchiveError(f"the archive's {HEADER} is not a JSON object")
        if head.get("format") != FORMAT:
            raise ArchiveError(f"the archive has format {head.get('format')!r}; this cbsd "
                               f"reads format {FORMAT} (a newer cbsd wrote it?)")
        return head

    def members(self) -> Iterator[tarfile.TarInfo]:
        """Every member up to the seal (which is read and kept, not handed out), each once."""
        seen: set[str] = set()
        while True:
            info = self._next()
            if info is None:
                raise ArchiveError("the archive is truncated (it ends before its seal)")
            if info.name == SEAL:
                if info.size > HEADER_MAX:
                    raise ArchiveError("the archive's seal is unreadable")
                self._seal = unseal(self._read_all(info), "seal")
                if self._next() is not None:
                    raise ArchiveError("the archive has members after its seal")
                return
            if not info.isfile():
                raise ArchiveError(f"the archive holds {info.name}, which is not a file")
            if info.name in seen or info.name == HEADER:
                raise ArchiveError(f"the archive holds {info.name} twice")
            seen.add(info.name)
            yield info

    def _read_all(self, info: tarfile.TarInfo) -> bytes:
        data = self._read(info.size + (-info.size % BLOCK))[:info.size]
        self.sums[info.name] = [info.size, xxhash.xxh3_128_hexdigest(data)]
        return data

    def extract(self, info: tarfile.TarInfo, dst: Path) -> None:
        """Write the member to *dst* (new, owner-only), leaving holes for runs of zeros."""
        h = xxhash.xxh3_128()
        left = info.size
        view = memoryview(self._buf)
        zeros = bytes(BUF)
        with created(dst) as fd:
            while left:
                want = min(left, BUF)
                n = self._in.readinto(view[:want])  # type: ignore[attr-defined]
                if not n:
                    raise ArchiveError(f"the archive is truncated (in {info.name})")
                chunk = view[:n]
                h.update(chunk)
                if n == BUF and self._buf == zeros:
                    os.lseek(fd, n, os.SEEK_CUR)
                else:
                    _write_all(fd, chunk)
                left -= n
            os.ftruncate(fd, info.size)
        self._read(-info.size % BLOCK)
        self.sums[info.name] = [info.size, h.hexdigest()]

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

    def end(self) -> None:
        """Read the rest of the end record Writer.close wrote (members() stops at its first
        block), so the stream can carry more after the archive (bmigrate's control channel)."""
        if self._read(tarfile.RECORDSIZE - BLOCK) != bytes(tarfile.RECORDSIZE - BLOCK):
            raise ArchiveError("the archive has data after its end")


def _pax_records(data: bytes) -> dict[str, str]:
    """A pax extended header's records, "LEN KEY=VALUE\\n" each."""
    out: dict[str, str] = {}
    pos = 0
    try:
        while pos < len(data) and data[pos] != 0:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            key, _, value = data[space + 1:pos + length - 1].partition(b"=")
            out[key.decode()] = value.decode("utf-8", "surrogateescape")
            pos += length
    except (ValueError, UnicodeDecodeError):
        raise ArchiveError("the archive has a damaged header") from None
    return out


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
