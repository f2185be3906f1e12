"""Validation of user-supplied names, masks and sizes (pure functions)."""

from __future__ import annotations

import re

from cbsd.errors import UsageError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # the contract's names
_MASK_RE = re.compile(r"[A-Za-z0-9_*?-]{1,64}")
_SIZE_RE = re.compile(r"([0-9]+)([kmgt]?)b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_FWD_RE = re.compile(r"(?:(tcp|udp):)?(?:(\d{1,3}(?:\.\d{1,3}){3}):)?(\d{1,5}):(\d{1,5})")

MIB = 1 << 20


def check_name(value: str, what: str = "jname") -> str:
    """A VM or checkpoint name: 1-64 of [A-Za-z0-9_-], not starting with _ or -."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):  # from JSON: any type
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


_DURATION_RE = re.compile(r"(?:[0-9]{1,6}[wdhm])+")
_DURATION_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60}


def parse_duration(value: str, what: str) -> int:
    """'2d', '12h', '30m', '1w', '1d12h' -> seconds (more than zero). checkpoint_expiry=."""
    if not _DURATION_RE.fullmatch(value):
        raise UsageError(f"bad value for {what}: '{value}' is not a duration (e.g. 30m, 12h, "
                         "2d, 1w, 1d12h)")
    n = sum(int(num) * _DURATION_UNITS[unit]
            for num, unit in re.findall(r"([0-9]+)([wdhm])", value))
    if n <= 0:
        raise UsageError(f"bad value for {what}: '{value}' must be longer than zero")
    return n


HA_MIN_INTERVAL = 5


def parse_interval(value: str, what: str) -> int:
    """'30s', '5m', '1m30s' or a number of seconds -> seconds, at least HA_MIN_INTERVAL
    (ha_interval=: how often a VM is replicated to its standby)."""
    if re.fullmatch(r"[0-9]{1,7}", value):
        n = int(value)
    elif re.fullmatch(r"(?:[0-9]{1,7}[hms])+", value):
        n = sum(int(num) * {"h": 3600, "m": 60, "s": 1}[unit]
                for num, unit in re.findall(r"([0-9]+)([hms])", value))
    else:
        raise UsageError(f"bad value for {what}: '{value}' is not an interval (e.g. 30s, 5m, "
                         "1m30s)")
    if n < HA_MIN_INTERVAL:
        raise UsageError(f"bad value for {what}: '{value}' is shorter than "
                         f"{HA_MIN_INTERVAL}s")
    return n


def format_size(n: int) -> str:
    for unit, mult in (("t", 1 << 40), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def parse_hostfwd(raw: str) -> list[str]:
    """'tcp:[BIND:]HOSTPORT:GUESTPORT,...' -> the rules as stored: 'PROTO:BIND:HOST:GUEST'
    (BIND 127.0.0.1 unless given: a forward listens on the host's loopback only, unless an
    address is given). bcreate/bset and every definition from outside (cbsd/specs.py)."""
    rules: list[str] = []
    for rule in filter(None, raw.split(",")):
        m = _FWD_RE.fullmatch(rule)
        bind = m.group(2) if m else None
        if not m or not all(1 <= int(p) <= 65535 for p in m.groups()[2:]) or (
                bind and not all(int(b) <= 255 for b in bind.split("."))):
            raise UsageError(f"bad value for hostfwd: '{rule}' "
                             "(use tcp:[BIND:]HOSTPORT:GUESTPORT)")
        proto, host_port = m.group(1) or "tcp", int(m.group(3))
        bind = bind or "127.0.0.1"
        if any(r.split(":")[0] == proto and r.split(":")[2] == str(host_port) for r in rules):
            raise UsageError(f"bad value for hostfwd: host port {proto}:{host_port} is "
                             "forwarded twice")
        rules.append(f"{proto}:{bind}:{host_port}:{int(m.group(4))}")
    return rules


# Six octets of two hex digits (one regex: every VM's NICs are checked at each inventory read).
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")


def check_mac(raw: str, what: str = "nic_hwaddr") -> str:
    """A unicast MAC address, stored lower-case with colons."""
    mac = raw.lower().replace("-", ":")
    if not _MAC.fullmatch(mac) or int(mac[:2], 16) & 1:
        raise UsageError(f"bad value for {what}: '{raw}' (a unicast MAC address, e.g. "
                         "52:54:00:12:34:56)")
    return mac


_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def check_ifname(name: str, what: str = "interface") -> str:
    if not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise UsageError(f"bad value for {what}: '{name}' (a network interface name: up to "
                         "15 letters, digits, '_', '.', '-')")
    return name
