"""Image pools: the security boundary between API clients and the host's files.

Through the CLI, root names any file (image=, iso=, kernel=, ...). Through the API a client may
name only a file inside a folder the administrator allowed (`cbsd serve pools=DIR,...`): never
/etc/shadow, never a path that leaves the pool by `..` or by a symlink, never another VM's disk
(even a pool inside the workdir cannot reach the VMs' files), and never an image whose backing
file or external data file lies outside the pools (qemu-img would read that file for it).

The path handed to the core is the resolved one (os.path.realpath): the core opens exactly the
file that was checked, through no symlink a client could have chosen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cbsd.errors import CbsdError, UsageError
from cbsd.storage.paths import Workdir

# bcreate's keys whose value is a host file (declared "path" in the CLI's key table), and
# ci_user_pubkey, which is a path when it is not the key itself.
FILE_KEYS = ("image", "iso", "kernel", "initrd")


class Forbidden(CbsdError):
    """A path outside the image pools (HTTP 403)."""


def parse_pools(value: str | None) -> list[Path]:
    """`pools=DIR,DIR` -> the pools' resolved folders; each must be an existing folder."""
    pools = []
    for raw in (value or "").split(","):
        if not raw.strip():
            continue
        path = Path(os.path.realpath(raw.strip()))
        if not path.is_dir():
            raise UsageError(f"serve: pools: {raw.strip()} is not a folder")
        pools.append(path)
    return pools


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def resolve(pools: Sequence[Path], wd: Workdir, key: str, value: str, command: str = "bcreate"
            ) -> str:
    """The real path of the file *value* names for *key*, if it lies inside a pool; else
    Forbidden (outside, or a VM's file) or UsageError (not a plain absolute path, missing)."""
    if not value.startswith("/"):
        raise UsageError(f"{command}: {key}={value}: give an absolute path inside an image pool")
    if ".." in Path(value).parts:
        raise UsageError(f"{command}: {key}={value}: '..' is not allowed in an image path")
    real = Path(os.path.realpath(value))
    pool = next((p for p in pools if _inside(real, p)), None)
    if pool is None:
        where = ", ".join(map(str, pools)) or "none: the service was started without pools="
        raise Forbidden(f"{command}: {key}={value}: not inside an image pool (pools: {where})")
    if any(_inside(real, wd.root.resolve() / d) for d in ("vm", "jails-system", "var",
                                                          "service")):
        raise Forbidden(f"{command}: {key}={value}: a VM's or cbsd's own file, not an image "
                        "of the pool")
    if not real.is_file():
        raise UsageError(f"{command}: {key}={value}: no such file in the image pool")
    return str(real)


def check_image_refs(pools: Sequence[Path], wd: Workdir, key: str, path: str,
                     command: str = "bcreate") -> None:
    """An image in the pool may name other files (a qcow2's backing file or data file):
    each must be in a pool too, or the API would read host files through it."""
    # lazy: only a create that imports an image asks qemu-img
    from cbsd.qemu import img

    info: dict[str, Any] = img.info(Path(path))
    refs = [info.get("full-backing-filename") or info.get("backing-filename"),
            info.get("format-specific", {}).get("data", {}).get("data-file")]
    for ref in refs:
        if ref:
            target = ref if ref.startswith("/") else str(Path(path).parent / ref)
            try:
                resolve(pools, wd, key, os.path.normpath(target))
            except CbsdError:
                raise Forbidden(f"{command}: {key}={path}: it refers to {ref}, outside the "
                                "image pools") from None


def confine(pools: Sequence[Path], wd: Workdir, keys: dict[str, Any], command: str = "bcreate"
            ) -> dict[str, Any]:
    """*keys* (bcreate's or bset's, from an API body) with every host path checked and
    resolved; anything outside the pools refused before the core sees it."""
    # lazy: only API bodies with cloud-init keys
    from cbsd.core.manage.cloudinit import names_a_file

    out = dict(keys)
    for key in FILE_KEYS:
        if out.get(key):
            out[key] = resolve(pools, wd, key, str(out[key]), command)
    if out.get("image"):
        check_image_refs(pools, wd, "image", out["image"], command)
    pubkey = out.get("ci_user_pubkey")
    if pubkey and names_a_file(str(pubkey)):
        out["ci_user_pubkey"] = resolve(pools, wd, "ci_user_pubkey", str(pubkey), command)
    return out
