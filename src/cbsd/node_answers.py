"""What a node answers, checked before cbsd uses any of it.

A node is another host: its cbsd may be of another version, broken, or in hostile hands (the
SSH login authenticates the node, not what its cbsd prints). So every answer is parsed into
the shape cbsd expects here -- types, ranges, names as cbsd allows them, text without control
characters (nothing a node says can drive this terminal) -- or refused with BadAnswer, which
the caller turns into one line naming the node (core/hosts/nodes.py). Pure functions.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from cbsd.model import BLS_COLUMNS, Status
from cbsd.names import NAME_RE

_STAGING_ID = re.compile(r"[0-9a-f]{16}")
_INT_COLUMNS = ("jid", "vm_ram", "vm_curmem", "vm_cpus")
_TEXT_COLUMNS = ("vm_os_type", "ip4_addr", "vnc_port")
_STATUSES = frozenset(s.value for s in Status)


class BadAnswer(ValueError):
    """A node's answer is not of the shape cbsd expects (the message says what)."""


def text(value: Any, what: str, limit: int = 256) -> str:
    """One short line of printable text."""
    if not isinstance(value, str):
        raise BadAnswer(f"{what} is not text")
    if len(value) > limit:
        raise BadAnswer(f"{what} is longer than {limit} characters")
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise BadAnswer(f"{what} holds control characters")
    return value


def name(value: Any, what: str = "jname") -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise BadAnswer(f"{what} {_shown(value)} is not a VM name")
    return value


def count(value: Any, what: str) -> int:
    """A non-negative integer (JSON true/false are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadAnswer(f"{what} {_shown(value)} is not a non-negative integer")
    return value


def bls_rows(data: Any) -> list[dict[str, Any]]:
    """`bls format=json` of a node: a list of rows with every column, each of its type.
    Keys this version does not know are dropped (a newer node may add columns)."""
    if not isinstance(data, list):
        raise BadAnswer("the listing is not a list of VMs")
    return [_bls_row(row, i) for i, row in enumerate(data)]


MAX_PCPU = 100 * 4096  # every vCPU QEMU allows, busy: beyond it, not a percentage


def _bls_row(row: Any, i: int) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise BadAnswer(f"VM #{i + 1} of the listing is not an object")
    missing = [c for c in BLS_COLUMNS if c not in row]
    if missing:
        raise BadAnswer(f"VM #{i + 1} of the listing lacks {', '.join(missing)}")
    jname = name(row["jname"])
    out: dict[str, Any] = {"jname": jname}
    for col in _INT_COLUMNS:
        out[col] = count(row[col], f"{jname}'s {col}")
    pcpu = row["pcpu"]
    if isinstance(pcpu, bool) or not isinstance(pcpu, (int, float)) or \
            not 0 <= pcpu <= MAX_PCPU:  # compares any int (isfinite overflows on 10**400)
        raise BadAnswer(f"{jname}'s pcpu {_shown(pcpu)} is not a percentage")
    out["pcpu"] = pcpu
    for col in _TEXT_COLUMNS:
        out[col] = text(row[col], f"{jname}'s {col}", 64)
    if not isinstance(row["status"], str) or row["status"] not in _STATUSES:
        raise BadAnswer(f"{jname}'s status {_shown(row['status'])} is not one of "
                        f"{', '.join(sorted(_STATUSES))}")
    out["status"] = row["status"]
    return {c: out[c] for c in BLS_COLUMNS}


def last_line(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    if not lines:
        raise BadAnswer("it answered nothing")
    return lines[-1]


def staging_id(out: str) -> str:
    """`bimport mode=stage`: the staging folder's id, 16 hex digits."""
    ident = last_line(out)
    if not _STAGING_ID.fullmatch(ident):
        raise BadAnswer(f"{_shown(ident)} is not a staging id")
    return ident


def committed(out: str) -> str:
    """`bimport mode=commit`: 'NAME: imported'; the name."""
    line = last_line(out)
    if not line.endswith(": imported"):
        raise BadAnswer(f"{_shown(line)} does not say the VM was imported")
    return name(line[: -len(": imported")])


def aborted(out: str) -> str | None:
    """`bimport mode=abort`: 'aborted' (None) or 'committed NAME' (the name)."""
    line = last_line(out)
    if line == "aborted":
        return None
    if line.startswith("committed "):
        return name(line[len("committed "):])
    raise BadAnswer(f"{_shown(line)} is neither 'aborted' nor 'committed NAME'")


def migrate_status(out: str) -> str:
    """`bmigrate mode=status`: 'registered' or 'absent'."""
    line = last_line(out)
    if line not in ("registered", "absent"):
        raise BadAnswer(f"{_shown(line)} is neither 'registered' nor 'absent'")
    return line


def migrate_sockets(data: Any) -> dict[str, str]:
    """`bmigrate mode=incoming`'s first line: the node's two Unix sockets, absolute paths
    that ssh's -L LOCAL:REMOTE can carry (no ':')."""
    if not isinstance(data, dict):
        raise BadAnswer("the sockets' answer is not an object")
    out = {}
    for key in ("nbd", "migration"):
        path = text(data.get(key), f"the {key} socket's path", 200)
        if not path.startswith("/") or ":" in path:
            raise BadAnswer(f"the {key} socket's path {_shown(path)} is not an absolute "
                            "path without ':'")
        out[key] = path
    return out


def migrate_done(data: Any) -> bool:
    """`bmigrate mode=incoming`'s last line: {"running": true|false}."""
    if not isinstance(data, dict) or not isinstance(data.get("running"), bool):
        raise BadAnswer("the last answer does not say whether the VM runs")
    return bool(data["running"])


def printable(s: str, limit: int = 300) -> str:
    """*s* as it may appear in a message here: control characters as '?', at most *limit*
    characters."""
    s = "".join(c if unicodedata.category(c) != "Cc" else "?" for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _shown(value: Any) -> str:
    """A value as it may appear in a message (short, printable)."""
    return printable(repr(value), 40)
