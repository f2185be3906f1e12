"""The export archive's format (storage/archive.py) and the pure checks around it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from cbsd import ssh
from cbsd.core.checkpoint import compat
from cbsd.core.hosts import transfer
from cbsd.errors import ArchiveError
from cbsd.model import VMSpec
from cbsd.qemu.host import Host
from cbsd.storage.archive import HEADER, SEAL, Reader, Source, Writer


def archive(tmp_path: Path, files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    w = Writer(out)
    w.add_bytes(HEADER, b'{"format": 1}')
    for name, data in files.items():
        src = tmp_path / name.replace("/", "_")
        src.write_bytes(data)
        w.add(name, Source(len(data), src))
    w.add("checkpoints/c.ckp/memory", Source(6, pieces=(b"ab", b"", b"cdef")))
    w.close()
    return out.getvalue()


def read_back(data: bytes, dst: Path) -> dict[str, bytes]:
    r = Reader(io.BytesIO(data))
    r.header()
    got = {}
    for info in r.members():
        path = dst / info.name.replace("/", "_")
        r.extract(info, path)
        got[info.name] = path.read_bytes()
    r.check_seal()
    return got


def test_round_trip_keeps_every_byte_and_holes(tmp_path: Path) -> None:
    zeros = bytes(3 << 20)
    data = archive(tmp_path, {"vm/d.qcow2": b"x" * 5000 + zeros + b"y"})
    (tmp_path / "out").mkdir()
    got = read_back(data, tmp_path / "out")
    assert got == {"vm/d.qcow2": b"x" * 5000 + zeros + b"y", "checkpoints/c.ckp/memory": b"abcdef"}
    disk = tmp_path / "out" / "vm_d.qcow2"
    assert disk.stat().st_blocks * 512 < disk.stat().st_size  # runs of zeros became holes
    assert disk.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:d.index(b"payload") + 300], "truncated"),
    (lambda d: d.replace(b"payload", b"pAyload"), "does not match its checksum"),
    (lambda d: d.replace(b'{"format": 1}', b'{ "format":1}', 1), "does not match its checksum"),
    (lambda d: d[:d.index(SEAL.encode()) - 512] + bytes(1024), "ends before its seal"),
    (lambda d: b"not a tar at all" * 64, "not a cbsd export"),
])
def test_damage_is_refused(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    data = damage(archive(tmp_path, {"vm/d.qcow2": b"payload" * 100}))
    (tmp_path / "out").mkdir()
    with pytest.raises(ArchiveError, match=message):
        read_back(data, tmp_path / "out")


@pytest.mark.parametrize("name, ok", [
    ("vm/dsk1.qcow2", True), ("checkpoints/c1.ckp/memory", True), ("hibernate.ckp/ram", True),
    ("boot/kernel", True), ("boot/other", False), ("vm/../x", False), ("../etc/passwd", False),
    ("/etc/passwd", False), ("vm/a/b", False), ("checkpoints/c1.ckp/../../x", False),
    ("jails-system/vm1/vm.json", False),
])
def test_only_documented_member_names_are_written(name: str, ok: bool) -> None:
    assert (bool(transfer._MEMBER.fullmatch(name)) and ".." not in name) == ok


def host(**kw: object) -> Host:
    base = dict(qemu="q", qemu_img="qi", version="7.2.0", accel="tcg", qboot=None,
                machines=(("pc-i440fx-7.2", None),))
    return Host(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("change, states, why", [
    ({}, {}, None),
    ({"machine": "pc-i440fx-9.9"}, {}, "machine type pc-i440fx-9.9"),
    ({"efi": "uefi"}, {}, "no OVMF"),
    ({}, {"checkpoints/a.ckp": {"qemu": "10.0.2", "accel": "tcg",
                                "machine": "pc-i440fx-7.2"}}, "newer than this host"),
    ({}, {"checkpoints/a.ckp": {"qemu": "7.2.0", "accel": "kvm",
                                "machine": "pc-i440fx-7.2"}}, "taken under kvm"),
])
def test_host_compatibility(change: dict[str, object], states: dict[str, dict[str, str]],
                            why: str | None) -> None:
    spec = VMSpec(jname="v", ram=1 << 26, **{"machine": "pc-i440fx-7.2", **change})  # type: ignore[arg-type]
    got = compat.host_incompatibility(host(), spec, {"cpu": {"model": "qemu64"}}, states)
    assert (got is None) if why is None else (why in (got or "")), got


def test_remote_arguments_are_quoted_and_hosts_checked() -> None:
    argv = ssh.Node("b", "root@10.0.0.2", 2222).argv(["bstart", "jname=a; rm -rf /"])
    assert argv[-2:] == ["root@10.0.0.2", "cbsd bstart 'jname=a; rm -rf /'"]
    assert argv[argv.index("-p") + 1] == "2222" and "BatchMode=yes" in argv
    assert not any("StrictHostKeyChecking" in a for a in argv)
    for bad in ("-oProxyCommand=x", "a b", "x;y", ""):
        with pytest.raises(Exception, match="bad host"):
            ssh.check_host(bad)


def test_end_reads_exactly_the_archive_so_the_stream_goes_on(tmp_path: Path) -> None:
    """bmigrate sends the checkpoints as an archive on its control channel, then a JSON line:
    Reader.end leaves the stream right after the archive's end record."""
    data = archive(tmp_path, {"vm/d.qcow2": b"d" * 3000})
    stream = io.BytesIO(data + b'{"go": true}\n')
    r = Reader(stream)
    r.header()
    for info in r.members():
        r.extract(info, tmp_path / ("x-" + info.name.replace("/", "_")))
    r.check_seal()
    r.end()
    assert stream.readline() == b'{"go": true}\n'
    r = Reader(io.BytesIO(data[:-1] + b"x"))
    r.header()
    for info in r.members():
        r.extract(info, tmp_path / ("y-" + info.name.replace("/", "_")))
    with pytest.raises(ArchiveError, match="after its end"):
        r.end()
