"""qemu-img: create, import, inspect and revert disk images (only on images no QEMU holds)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from cbsd.errors import QemuError
from cbsd.qemu.host import qemu_img_path


def _run(*args: str) -> str:
    from cbsd import debug

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
    """Any image qemu-img reads -> qcow2 (*source*: its format, when probing is unsafe)."""
    _run("convert", "-q", *(("-f", source) if source else ()), "-O", "qcow2", str(src),
         str(dst))


def resize(path: Path, size: int) -> None:
    _run("resize", "-q", str(path), str(size))


def info(path: Path) -> dict[str, Any]:
    return dict(json.loads(_run("info", "--output=json", "-U", str(path))))


def snapshots(path: Path) -> list[str]:
    return [s["name"] for s in info(path).get("snapshots", [])]


def snapshot_apply(path: Path, tag: str) -> None:
    _run("snapshot", "-a", tag, str(path))


def snapshot_delete(path: Path, tag: str) -> None:
    _run("snapshot", "-d", tag, str(path))
