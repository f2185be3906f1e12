"""qemu-img: create, import, inspect and revert disk images (only on images no QEMU holds).

Every image cbsd opens is a *self-contained* qcow2 (docs/many-hosts.md, "Trust model: disk
images and archives"): a qcow2 header can name other files -- a backing file, an external data
file -- and QEMU, running as root, would read the guest's disk from them or write it over them.
An image from outside (bimport, bcreate image=, a file attached by bhyve-dsk) is checked here
before cbsd registers or attaches it: its header first, by cbsd itself (so not even qemu-img
opens a file the image names), then `qemu-img info -f qcow2`. QEMU is told never to follow a
backing file (qemu/argv.py: "backing": null) and every launch checks the headers again.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbsd import debug
from cbsd.errors import QemuError, UsageError
from cbsd.qemu.host import qemu_img_path

QCOW2_MAGIC = b"QFI\xfb"
MAX_VIRTUAL_SIZE = 1 << 50  # 1 PiB: larger is a damaged or hostile header, not a disk
_DATA_FILE = 1 << 2  # qcow2 incompatible feature: the guest's data is in an external file


def _run(*args: str) -> str:
    res = subprocess.run([qemu_img_path(), *args], capture_output=True, text=True, check=False)
    if debug.ON:
        debug.log("proc", f"qemu-img {' '.join(args)} -> exit {res.returncode}")
    if res.returncode != 0:
        msg = (res.stderr.strip().splitlines() or ["failed"])[-1]
        raise QemuError(f"qemu-img {args[0]}: {msg.removeprefix('qemu-img: ')}")
    return res.stdout


def create(path: Path, size: int) -> None:
    _run("create", "-q", "-f", "qcow2", str(path), str(size))


def convert(src: Path, dst: Path, source: str | None = None) -> None:
    """Any image qemu-img reads -> qcow2 (*source*: its format, when probing is unsafe). The
    result is self-contained: convert reads through the source's backing chain (flattens it)
    and writes one qcow2 that names no other file."""
    _run("convert", "-q", *(("-f", source) if source else ()), "-O", "qcow2", str(src),
         str(dst))


def resize(path: Path, size: int) -> None:
    _run("resize", "-q", str(path), str(size))


def info(path: Path) -> dict[str, Any]:
    return dict(json.loads(_run("info", "--output=json", "-U", str(path))))


def snapshots(path: Path) -> list[str]:
    return [s["name"] for s in info(path).get("snapshots", [])]


def snapshot_list(path: Path) -> list[dict[str, Any]]:
    """Each internal snapshot as qemu-img reports it (name, date-sec, ...), oldest first."""
    return list(info(path).get("snapshots", []))


def snapshot_create(path: Path, tag: str) -> None:
    _run("snapshot", "-c", tag, str(path))


def snapshot_apply(path: Path, tag: str) -> None:
    _run("snapshot", "-a", tag, str(path))


def snapshot_delete(path: Path, tag: str) -> None:
    _run("snapshot", "-d", tag, str(path))


def write_snapshot(src: Path, tag: str, dst: Path) -> None:
    """Internal snapshot *tag* of the qcow2 *src* written over the active layer of the
    existing qcow2 *dst* (every byte: zeros too). *src* may be in use by a running QEMU
    (-U): a snapshot's clusters and tables never change while it exists (a write to them
    is copied elsewhere first), so what is read is exactly the snapshot."""
    _run("convert", "-q", "-U", "-n", "-f", "qcow2", "-O", "qcow2", "-l",
         f"snapshot.name={tag}", str(src), str(dst))


def snapshot_to(src: Path, tag: str, dst: Path) -> None:
    """Internal snapshot *tag* of *src* (which may be in use: -U, as write_snapshot) as a new
    qcow2 *dst* holding only the snapshot's allocated clusters."""
    _run("convert", "-q", "-U", "-f", "qcow2", "-O", "qcow2", "-l", f"snapshot.name={tag}",
         str(src), str(dst))


def write_over(src: Path, dst: Path) -> None:
    """The qcow2 *src*'s contents written over the active layer of the existing qcow2 *dst*
    (every byte, zeros too; dst's snapshots untouched)."""
    _run("convert", "-q", "-n", "-f", "qcow2", "-O", "qcow2", str(src), str(dst))


def commit_into(top: Path, image: Path) -> None:
    """The clusters allocated in the self-contained qcow2 *top* written into *image*'s active
    layer, nothing else (*top* is given *image* as its backing file, by cbsd, for this one
    commit, then emptied: the caller deletes it)."""
    _run("rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(image.resolve()),
         str(top))
    _run("commit", "-q", "-f", "qcow2", str(top))


def compare(a: Path, b: Path) -> None:
    """QemuError unless the two qcow2 images' active layers read the same."""
    _run("compare", "-q", "-f", "qcow2", "-F", "qcow2", str(a), str(b))


# --- is an image self-contained? ----------------------------------------------------------

@dataclass(frozen=True)
class ImageInfo:
    """What `qemu-img info --output=json` says of an image, as far as cbsd cares."""

    format: str
    virtual_size: int
    backing: str | None  # the backing file its header names
    data_file: str | None  # the external data file its header names (qcow2 only)
    snapshots: frozenset[str]


def parse_info(text: str) -> ImageInfo:
    """`qemu-img info --output=json` -> ImageInfo (pure). ValueError if it is not that."""
    try:
        d = json.loads(text)
        specific = d.get("format-specific") or {}
        data = specific.get("data") or {}
        backing = d.get("backing-filename") or d.get("full-backing-filename")
        return ImageInfo(
            format=str(d["format"]), virtual_size=int(d["virtual-size"]),
            backing=str(backing) if backing else None,
            data_file=str(data["data-file"]) if data.get("data-file") else None,
            snapshots=frozenset(str(s["name"]) for s in d.get("snapshots") or ()))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"unexpected qemu-img info output ({e!r})") from None


def unsafe(i: ImageInfo) -> str | None:
    """Why an image is not a self-contained qcow2 of a sane size, or None (pure)."""
    if i.format != "qcow2":
        return f"is {i.format}, not qcow2"
    if i.backing:
        return f"names a backing file ({i.backing})"
    if i.data_file:
        return f"names an external data file ({i.data_file})"
    if not 0 < i.virtual_size <= MAX_VIRTUAL_SIZE:
        return f"declares a virtual size of {i.virtual_size} bytes"
    return None


def header_problem(head: bytes) -> str | None:
    """Why a qcow2 header (its first 104 bytes) names files beyond the image, or is not a
    qcow2 one, or None (pure: what QEMU itself reads to decide what else to open)."""
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        return "is not a qcow2 image"
    version = int.from_bytes(head[4:8], "big")
    if version not in (2, 3):
        return f"is a qcow2 image of version {version}"
    if int.from_bytes(head[8:16], "big") or int.from_bytes(head[16:20], "big"):
        return "names a backing file"
    if int.from_bytes(head[32:36], "big"):
        return "is encrypted"
    if version == 3 and (len(head) < 80 or int.from_bytes(head[72:80], "big") & _DATA_FILE):
        return "names an external data file"
    return None


def check_header(path: Path, what: str) -> None:
    """UsageError unless *path* is a qcow2 whose header names no other file (no qemu-img)."""
    try:
        with open(path, "rb") as f:
            head = f.read(104)
    except OSError as e:
        raise UsageError(f"{what} cannot be read ({e.strerror or e})") from None
    why = header_problem(head)
    if why:
        raise UsageError(f"{what} {why}: cbsd opens only self-contained qcow2 images")


def check(path: Path, what: str) -> ImageInfo:
    """*path* as a self-contained qcow2 of a sane size that qemu-img reads (UsageError, the
    message naming *what*, otherwise); its facts, snapshots included."""
    check_header(path, what)
    try:
        got = parse_info(_run("info", "--output=json", "-U", "-f", "qcow2", str(path)))
    except QemuError as e:
        raise UsageError(f"{what} is not a readable qcow2 image ({e})") from None
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None
    why = unsafe(got)
    if why:
        raise UsageError(f"{what} {why}: cbsd opens only self-contained qcow2 images")
    return got
