"""The image check (qemu/img.py) on recorded `qemu-img info --output=json` of QEMU 7.2 and
10.0 and on recorded qcow2 headers: a self-contained qcow2 passes; one naming a backing file
or an external data file, or not qcow2, or of an absurd size, does not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cbsd.errors import UsageError
from cbsd.qemu import img
from tests.paths import UNIT_DATA as DATA

VERSIONS = ("7.2", "10.0")


def recorded(version: str, kind: str) -> img.ImageInfo:
    return img.parse_info((DATA / f"qemu-img-{version}-{kind}.json").read_text())


@pytest.mark.parametrize("version", VERSIONS)
def test_a_self_contained_qcow2_passes_with_its_snapshots(version: str) -> None:
    i = recorded(version, "plain")
    assert (i.format, i.backing, i.data_file) == ("qcow2", None, None)
    assert i.snapshots == {"cbsd-c1-abc"} and i.virtual_size == 1 << 20
    assert img.unsafe(i) is None


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind,why", [("back", "names a backing file (/tmp/ti/host.txt)"),
                                      ("dfile", "names an external data file (/tmp/ti/host"),
                                      ("raw", "is raw, not qcow2")])
def test_an_image_naming_other_files_or_not_qcow2_is_refused(version: str, kind: str,
                                                             why: str) -> None:
    assert (img.unsafe(recorded(version, kind)) or "").startswith(why)


@pytest.mark.parametrize("size", [0, -1, img.MAX_VIRTUAL_SIZE + 1])
def test_an_absurd_virtual_size_is_refused(size: int) -> None:
    i = dataclasses.replace(recorded("10.0", "plain"), virtual_size=size)
    assert "virtual size" in (img.unsafe(i) or "")


@pytest.mark.parametrize("text", ["", "[]", '{"format": "qcow2"}', "{\"format\": 1, "
                                  "\"virtual-size\": 5, \"snapshots\": [{}]}"])
def test_unexpected_output_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        img.parse_info(text)


@pytest.mark.parametrize("kind,why", [("plain", None), ("v2", None),
                                      ("back", "names a backing file"),
                                      ("dfile", "names an external data file")])
def test_the_header_says_what_qemu_would_open(kind: str, why: str | None) -> None:
    assert img.header_problem((DATA / f"qcow2-{kind}.header").read_bytes()) == why


def test_a_header_that_is_not_qcow2_or_is_encrypted_is_refused(tmp_path: Path) -> None:
    head = bytearray((DATA / "qcow2-plain.header").read_bytes())
    assert img.header_problem(b"\0" * 104) == "is not a qcow2 image"
    assert img.header_problem(bytes(head[:40])) == "is not a qcow2 image"
    head[35] = 1
    assert img.header_problem(bytes(head)) == "is encrypted"
    (tmp_path / "x").write_bytes(bytes(head))
    with pytest.raises(UsageError, match=r"^disk x is encrypted: cbsd opens only self-contained"):
        img.check_header(tmp_path / "x", "disk x")


@pytest.mark.parametrize("file,why", [
    ("dsk2.qcow2", None), ("data-1.qcow2", None),
    ("efivars.qcow2", "is cbsd's own file of the VM"), ("seed.iso", "is cbsd's own file"),
    ("boot-kernel", "is cbsd's own file"), ("../x.qcow2", "is not a disk's file name"),
    ("dsk2.raw", "is not a disk's file name"), (".qcow2", "is not a disk's file name"),
    (5, "is not a disk's file name")])
def test_a_disk_is_named_like_one_and_is_none_of_the_vms_own_files(file: object,
                                                                    why: str | None) -> None:
    from cbsd.core.manage.disks import disk_file_problem
    from cbsd.storage.paths import Workdir

    got = disk_file_problem(Workdir(Path("/w")), "vm1", file)  # type: ignore[arg-type]
    assert got == why if why is None else why in (got or "")
