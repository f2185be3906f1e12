"""Validation of user-supplied names, masks and sizes (pure functions)."""

from __future__ import annotations

import re

from cbsd.errors import UsageError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_MASK_RE = re.compile(r"[A-Za-z0-9_*?-]{1,64}")
_SIZE_RE = re.compile(r"([0-9]+)([kmgt]?)b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

MIB = 1 << 20


def check_name(value: str, what: str = "jname") -> str:
    """A VM or checkpoint name: 1-64 of [A-Za-z0-9_-], not starting with _ or -."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):  # from JSON: any type
        raise UsageError(
            f"bad {what} '{value}': use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_mask(value: str, what: str = "jname") -> str:
    if not _MASK_RE.fullmatch(value) or value[0] in "_-":
        raise UsageError(
            f"bad {what} '{value}': use a name or a mask of letters, digits, '_', '-', '*' and '?'"
        )
    return value


def is_mask(value: str) -> bool:
    return "*" in value or "?" in value


def mask_regex(mask: str) -> re.Pattern[str]:
    """Shell-glob semantics restricted to * and ? (no [...] classes), case-sensitive."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in mask]
    return re.compile("".join(parts), re.DOTALL)


def match_mask(mask: str, names: list[str]) -> list[str]:
    rx = mask_regex(mask)
    return [n for n in names if rx.fullmatch(n)]


def parse_size(value: str, what: str) -> int:
    """'512m', '1g', '10G', '4096' (bytes) -> bytes."""
    m = _SIZE_RE.fullmatch(value.strip())
    if not m:
        raise UsageError(f"bad value for {what}: '{value}' is not a size (e.g. 512m, 2g)")
    n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise UsageError(f"bad value for {what}: '{value}' must be greater than zero")
    return n


def format_size(n: int) -> str:
    for unit, mult in (("t", 1 << 40), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
