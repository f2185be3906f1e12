"""Disk images and archives from outside (issue 26, items 2, 4, 12, 13), through the CLI: a
qcow2 naming a host file (as its backing file or its external data file) is refused wherever
it would enter -- bimport, bhyve-dsk attach, bclone, bstart of an image planted in a VM's
folder -- and the host file is neither read into a guest nor written; an archive whose images
or checkpoints cannot work, or that was edited by hand, is refused with exit 2 and leaves
nothing; a VM's own files cannot be attached as disks. Each test failed before its fix.

The hostile host file is a copy of the counter guest's boot disk: a guest that boots from it
prints counter lines, and the counter writes its disk, so a VM that read or wrote it shows."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cbsd.storage.archive import HEADER, SEAL, Writer
from cbsd.storage.chunkstore import MAGIC, RECIPE
from tests.guests import build
from tests.harness import COUNTER_RE, Cbsd, kill_vms
from tests.vmchecks import leftovers, vm_with_checkpoints, wait_folded

pytestmark = pytest.mark.vm
Members = list[tuple[str, bytes]]
NOTHING = "nothing was imported"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hostile(tmp: Path, kind: str) -> tuple[Path, Path]:
    """(a qcow2 whose header names a host file, that host file: a bootable counter disk)."""
    host = tmp / f"host-{kind}.img"
    image = tmp / f"hostile-{kind}.qcow2"
    opts = (["-b", str(host), "-F", "raw"] if kind == "backing" else
            ["-o", f"data_file={host},data_file_raw=on"])
    build.counter_image(host)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(image), "1M"],
                   check=True)
    build.counter_image(host)  # again: creating an image over a data file empties it
    return image, host


def read_archive(path: Path) -> tuple[dict[str, object], Members]:
    with tarfile.open(path) as t:
        files = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]  # type: ignore[union-attr]
    assert files[0][0] == HEADER and files[-1][0] == SEAL
    return json.loads(files[0][1]), files[1:-1]


def write_archive(path: Path, head: dict[str, object] | bytes, members: Members) -> None:
    """A well-formed, sealed archive of *members* (its header listing them as they are)."""
    if isinstance(head, dict):
        head = json.dumps({**head, "members": [[n, len(d)] for n, d in members]}).encode()
    with open(path, "wb") as f:
        w = Writer(f)
        w.add_bytes(HEADER, head)
        for name, data in members:
            w.add_bytes(name, data)
        w.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An export of vm1, the counter guest, stopped, with checkpoint c1."""
    tmp = tmp_path_factory.mktemp("source")
    cbsd = Cbsd(tmp / "wd")
    try:
        vm_with_checkpoints(cbsd, build.counter_image(tmp / "counter.raw"), "c1")
        cbsd("bstop", "vm1", "noacpi=1").ok()
        cbsd("bexport", "jname=vm1", f"out={tmp / 'vm1.cbsd'}").ok()
    finally:
        kill_vms(cbsd.workdir)
    yield tmp / "vm1.cbsd"


@pytest.fixture
def other(tmp_path: Path) -> Iterator[Cbsd]:
    runner = Cbsd(tmp_path / "wd2")
    yield runner
    kill_vms(runner.workdir)


def refused(other: Cbsd, archive: Path, message: str) -> None:
    r = other("bimport", f"in={archive}").fails(2, message)
    assert r.err.rstrip().endswith(NOTHING), r.err
    assert other("bls", "header=0").ok().out == "" and leftovers(other) == []


# --- 2. images naming host files --------------------------------------------------------------

def _with_disk(members: Members, name: str, data: bytes) -> Members:
    return [(n, data if n == name else d) for n, d in members] + \
        ([] if any(n == name for n, _ in members) else [(name, data)])


@pytest.mark.parametrize("member", ["vm/dsk1.qcow2", "vm/dsk9.qcow2"])
@pytest.mark.parametrize("kind,message", [("backing", "names a backing file"),
                                          ("data-file", "names an external data file")])
def test_bimport_refuses_an_image_naming_a_host_file(other: Cbsd, source: Path,
                                                     tmp_path: Path, kind: str, message: str,
                                                     member: str) -> None:
    """Its disk, or a detached disk beside it (bhyve-dsk attach could take it later)."""
    image, host = hostile(tmp_path, kind)
    before = sha(host)
    head, members = read_archive(source)
    archive = tmp_path / "hostile.cbsd"
    write_archive(archive, head, _with_disk(members, member, image.read_bytes()))
    refused(other, archive, f"the archive's {member} {message}")
    assert sha(host) == before


PLANTED = pytest.mark.parametrize("kind,message", [("backing", "names a backing file"),
                                                   ("data-file", "names an external data file")])


def planted(cbsd: Cbsd, tmp_path: Path, kind: str, file: str) -> tuple[Path, str]:
    """vm1 defined, and a hostile image as *file* in its folder -- as a VM imported before
    the check had, or a file put there by hand; (the host file it names, its checksum)."""
    image, host = hostile(tmp_path, kind)
    cbsd("bcreate", "jname=vm1", f"image={build.counter_image(tmp_path / 'c.raw')}",
         "vm_os_type=other", "vm_ram=32m").ok()
    shutil.copy(image, cbsd.workdir / "vm" / "vm1" / file)
    return host, sha(host)


@PLANTED
def test_bstart_and_bclone_refuse_a_disk_naming_a_host_file(cbsd: Cbsd, tmp_path: Path,
                                                           kind: str, message: str) -> None:
    host, before = planted(cbsd, tmp_path, kind, "dsk1.qcow2")
    cbsd("bstart", "vm1").fails(1, f"vm1: dsk1.qcow2 {message}")
    cbsd("bclone", "old=vm1", "new=vm2").fails(1, f"vm1: dsk1.qcow2 {message}")
    assert cbsd.status("vm1") == "Off" and [v["jname"] for v in cbsd.bls()] == ["vm1"]
    log = cbsd.system("vm1") / "console.log"
    assert not log.exists() or "n=" not in log.read_text(), "the guest ran the host file"
    assert sha(host) == before


@PLANTED
def test_bhyve_dsk_attach_refuses_an_image_naming_a_host_file(cbsd: Cbsd, tmp_path: Path,
                                                             kind: str, message: str) -> None:
    host, before = planted(cbsd, tmp_path, kind, "dsk5.qcow2")
    cbsd("bhyve-dsk", "mode=attach", "jname=vm1", "dsk_name=dsk5").fails(2, message)
    assert [d["dsk_name"] for d in json.loads(cbsd("bhyve-dsk", "mode=list", "jname=vm1",
                                                   "format=json").ok().out)] == ["dsk1"]
    assert sha(host) == before


def test_qemu_opens_no_backing_file_whatever_the_header_says(tmp_path: Path) -> None:
    """The second line of defence, below the header checks: the disks' -blockdev options as
    cbsd builds them, given to this host's QEMU with an image naming a backing file."""
    import dataclasses
    import os

    from cbsd.model import VMSpec
    from cbsd.qemu.argv import build_argv
    from tests.unit.qemu.test_argv import HOST, PATHS

    image, host = hostile(tmp_path, "backing")
    argv = build_argv(VMSpec(jname="x", ram=32 << 20, machine="pc", disks=["dsk1.qcow2"]),
                      HOST, dataclasses.replace(PATHS, disks=(str(image),)))
    blockdevs = [a for i, a in enumerate(argv[1:]) if argv[i] == "-blockdev"]
    qmp = ('{"execute":"qmp_capabilities"}{"execute":"query-named-block-nodes"}'
           '{"execute":"quit"}')
    out = subprocess.run([os.environ.get("CBSD_QEMU", "qemu-system-x86_64"), "-machine",
                          "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio",
                          *(x for b in blockdevs for x in ("-blockdev", b))],
                         input=qmp, capture_output=True, text=True, timeout=60, check=True)
    nodes = next(json.loads(line)["return"] for line in out.stdout.splitlines()
             if line.startswith('{"return": ['))
    assert {n["node-name"] for n in nodes} == {"disk0", "disk0-file"}, nodes
    assert all(n["file"] != str(host) and n["backing_file_depth"] == 0 for n in nodes), nodes


@pytest.mark.parametrize("kind", ["backing", "data-file"])
def test_bcreate_image_naming_other_files_is_flattened(cbsd: Cbsd, tmp_path: Path,
                                                       kind: str) -> None:
    """image= is the user's own file: read whole (through its backing chain or data file,
    as the user could) into a self-contained disk that names no other file."""
    overlay, _ = hostile(tmp_path, kind)
    cbsd("bcreate", "jname=vm1", f"image={overlay}", "vm_os_type=other", "vm_ram=32m").ok()
    disk = cbsd.workdir / "vm" / "vm1" / "dsk1.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(disk)],
                                     capture_output=True, text=True, check=True).stdout)
    assert "backing-filename" not in info and "data-file" not in json.dumps(info)
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)


# --- 4. nothing registered unless everything checks in staging --------------------------------

def _drop_snapshots(data: bytes, tmp: Path) -> bytes:
    path = tmp / "nosnap.qcow2"
    path.write_bytes(data)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)
    for s in info.get("snapshots", []):
        subprocess.run(["qemu-img", "snapshot", "-d", s["name"], str(path)], check=True)
    return path.read_bytes()


def _pax_bomb(path: Path, head: bytes) -> None:
    """The header, then a pax header that declares a terabyte (and holds a block)."""
    with open(path, "wb") as f:
        Writer(f).add_bytes(HEADER, head)
        bomb = tarfile.TarInfo("pax")
        bomb.type, bomb.size = tarfile.XHDTYPE, 1 << 40
        f.write(bomb.tobuf(tarfile.GNU_FORMAT) + bytes(tarfile.BLOCKSIZE))


def _bad_clusters(data: bytes) -> bytes:
    """A qcow2 header qemu-img refuses: cluster_bits 99."""
    return data[:20] + (99).to_bytes(4, "big") + data[24:]


Edit = Callable[[dict[str, object], Members, Path], tuple[dict[str, object] | bytes, Members]]
EDITS: dict[str, tuple[Edit, str]] = {
    "unreadable image": (lambda h, m, t: (h, _with_disk(m, "vm/dsk1.qcow2", b"no image" * 99)),
                         "the archive's vm/dsk1.qcow2 is not a qcow2 image"),
    "image qemu-img cannot read": (
        lambda h, m, t: (h, _with_disk(m, "vm/dsk1.qcow2",
                                       _bad_clusters(dict(m)["vm/dsk1.qcow2"]))),
        "the archive's vm/dsk1.qcow2 is not a readable qcow2 image (qemu-img info"),
    "checkpoint's disk snapshot missing": (
        lambda h, m, t: (h, _with_disk(m, "vm/dsk1.qcow2",
                                       _drop_snapshots(dict(m)["vm/dsk1.qcow2"], t))),
        "the archive's checkpoint c1 is damaged: disk snapshot cbsd-c1-"),
    "a disk the definition names is missing": (
        lambda h, m, t: (h, [(n, d) for n, d in m if n != "vm/dsk1.qcow2"]),
        "dsk1.qcow2"),  # whichever check finds it first names it
    "checkpoint without its manifest": (
        lambda h, m, t: (h, [(n, d) for n, d in m if n != "checkpoints/c1.ckp/manifest.json"]),
        "checkpoint c1 is damaged: its manifest is missing"),
    "duplicate member": (lambda h, m, t: (h, [*m, m[0]]), "the archive holds vm/dsk1.qcow2 twice"),
    "header not an object": (lambda h, m, t: (b"[1, 2]", m), f"{HEADER} is not a JSON object"),
    "the VM's own file as a disk": (
        lambda h, m, t: ({**h, "spec": {**h["spec"],  # type: ignore[dict-item]
                                        "disks": ["dsk1.qcow2", "efivars.qcow2"]}},
                         [*m, ("vm/efivars.qcow2", dict(m)["vm/dsk1.qcow2"])]),
        "efivars.qcow2"),
    "a VM name that is a number": (
        lambda h, m, t: ({**h, "spec": {**h["spec"], "jname": 5}}, m),  # type: ignore[dict-item]
        "jname"),
    "a disk name that is a number": (
        lambda h, m, t: ({**h, "spec": {**h["spec"], "disks": [5]}}, m),  # type: ignore[dict-item]
        "disk"),
}


@pytest.mark.parametrize("kind", sorted(EDITS))
def test_an_archive_that_cannot_work_is_refused_in_staging(other: Cbsd, source: Path,
                                                           tmp_path: Path, kind: str) -> None:
    edit, message = EDITS[kind]
    head, members = read_archive(source)
    archive = tmp_path / "edited.cbsd"
    write_archive(archive, *edit(head, members, tmp_path))
    refused(other, archive, message)


def test_a_huge_declared_pax_header_is_refused_unread(other: Cbsd, source: Path,
                                                     tmp_path: Path) -> None:
    head, _ = read_archive(source)
    archive = tmp_path / "bomb.cbsd"
    _pax_bomb(archive, json.dumps(head).encode())
    refused(other, archive, "a pax header of 1099511627776 bytes")


# --- 12. a VM's own files are not disks ------------------------------------------------------

@pytest.mark.parametrize("efi", ["uefi", "none"])
def test_the_uefi_variable_store_cannot_be_attached_as_a_disk(cbsd: Cbsd, efi: str) -> None:
    cbsd("bcreate", "jname=vm1", f"vm_efi={efi}", "imgsize=1m", "vm_os_type=linux").ok()
    cbsd("bhyve-dsk", "mode=attach", "jname=vm1", "dsk_name=efivars", "dsk_size=1m").fails(
        2, "efivars.qcow2 is cbsd's own file of the VM, not a disk")
    cbsd("bhyve-dsk", "mode=attach", "jname=vm1", "dsk_name=efivars").fails(
        2, "efivars.qcow2 is cbsd's own file of the VM, not a disk")
    spec = json.loads((cbsd.system("vm1") / "vm.json").read_text())
    assert spec["disks"] == ["dsk1.qcow2"]


# --- 13. the smaller ones --------------------------------------------------------------------

def test_node_add_refuses_a_host_that_is_an_ssh_option(cbsd: Cbsd) -> None:
    for host in ("-oProxyCommand=touch /tmp/x", "-oProxyCommand@host"):
        cbsd("node", "mode=add", "name=n1", f"host={host}").fails(2, "node: bad host")


def test_bexport_of_a_damaged_folded_recipe_names_the_checkpoint(
        cbsd: Cbsd, tmp_path: Path) -> None:
    # vm_ramfile=off: a checkpoint's memory is a stream, folded into the chunk store.
    cbsd("bcreate", "jname=vm1", f"image={build.counter_image(tmp_path / 'c.raw')}",
         "vm_os_type=other", "vm_ram=32m", "vm_ramfile=off").ok()
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c1").ok()
    wait_folded(cbsd)
    cbsd("bstop", "vm1", "noacpi=1").ok()
    recipe = cbsd.system("vm1") / "checkpoints" / "c1.ckp" / RECIPE
    recipe.write_bytes(MAGIC + b'{"packs": [')  # cut short
    r = cbsd("bexport", "jname=vm1", f"out={tmp_path / 'x.cbsd'}").fails(1, "checkpoint c1")
    assert "internal error" not in r.err

