"""Definitions from outside: a VM's spec as an archive, a node, a vm.json or an inventory row
holds it, checked field by field by the rules bcreate and bset apply, before anything acts on it.

A definition is data, never a command: every key must be one VMSpec has, every value of its
type and range, disk names plain file names of the shape cbsd gives them (so no name reaches
a path outside the VM's folder), VNC only on a loopback address, host port forwards of the
exact shape bcreate stores. bimport adds what only it can know (core/hosts/transfer.py): the disks
and boot media named must be the archive's own members. The rule as users see it is in
docs/many-hosts.md, "Trust model: definitions".

Pure: no I/O. ``from_untrusted`` is the one entry point; ``check_relations`` holds the rules
between keys that bcreate and bset apply too (core/manage/lifecycle.validate).
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Callable
from typing import Any

from cbsd.errors import UsageError
from cbsd.model import (
    AUTO_OFF,
    CLOUD_INIT_KEYS,
    CONTROLLERS,
    EFI_MODES,
    MAX_CPUS,
    MAX_NICS,
    NIC_TYPES,
    NICS,
    OS_TYPES,
    Nic,
    VMSpec,
)
from cbsd.names import (
    MIB,
    check_ifname,
    check_mac,
    check_name,
    parse_duration,
    parse_hostfwd,
    parse_interval,
)

MIN_RAM = 16 * MIB
# No number from outside is taken unbounded: 16 TiB is beyond any guest QEMU runs on x86.
MAX_RAM = 1 << 44
MAX_TEXT = 65536  # cmdline, passwords, cloud-init values (several keys in ci_user_pubkey)
# What bcreate and bhyve-dsk name disk files: a VM-style name and .qcow2 (core/manage/disks.py).
DISK_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.qcow2")
RESERVED_FILES = ("efivars.qcow2",)  # core/vm/machine.EFI_VARS: the UEFI variable store, not a disk
# QEMU machine types (pc, pc-i440fx-10.0, q35): one token, nothing QEMU's option syntax reads.
MACHINE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Kept beside the ci_* keys (core/manage/cloudinit.settings): cloud-init's instance id, and
# the machine's identity (a new one only for a clone: its guest then renews machine-id and
# SSH host keys at first boot).
CI_STORED = ("instance_id", "identity_id")

Check = Callable[[Any, str], Any]


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad(field: str, value: Any, want: str) -> UsageError:
    return UsageError(f"bad value for {field}: {_show(value)} ({want})")


def _int(lo: int, hi: int) -> Check:
    def check(v: Any, field: str) -> int:
        # bool is an int to Python, never to a definition.
        if type(v) is not int or not lo <= v <= hi:
            raise _bad(field, v, f"a whole number from {lo} to {hi}")
        return v
    return check


def _bool(v: Any, field: str) -> bool:
    if type(v) is not bool:
        raise _bad(field, v, "true or false")
    return v


def _enum(choices: tuple[str, ...]) -> Check:
    def check(v: Any, field: str) -> str:
        if not isinstance(v, str) or v not in choices:
            raise _bad(field, v, f"one of: {', '.join(choices)}")
        return v
    return check


def _text(v: Any, field: str) -> str:
    if not isinstance(v, str) or "\0" in v or len(v) > MAX_TEXT:
        raise _bad(field, v, f"a text of at most {MAX_TEXT} characters, no NUL byte")
    return v


def _path(v: Any, field: str) -> str:
    if not isinstance(v, str) or not v.startswith("/") or "\0" in v or len(v) > MAX_TEXT:
        raise _bad(field, v, "an absolute path")
    return v


def _optional(check: Check) -> Check:
    def optional(v: Any, field: str) -> Any:
        return None if v is None else check(v, field)
    return optional


def _or_empty(check: Callable[[str, str], str]) -> Check:
    """"" (the default) or a string *check* accepts; its own message names the field."""
    def check_str(v: Any, field: str) -> str:
        if not isinstance(v, str):
            raise _bad(field, v, "a string")
        return v if v == "" else check(v, field)
    return check_str


def _name(v: Any, field: str) -> str:
    if not isinstance(v, str):
        raise _bad(field, v, "a name")
    return check_name(v, field)


def _disk_file(v: Any, field: str) -> str:
    if not isinstance(v, str) or not DISK_FILE.fullmatch(v) or v in RESERVED_FILES:
        raise _bad(field, v, "a disk file name NAME.qcow2 inside the VM's folder")
    return v


def _disks(v: Any, field: str) -> list[str]:
    if not isinstance(v, list):
        raise _bad(field, v, "a list of disk file names")
    disks = [_disk_file(d, field) for d in v]
    if len(set(disks)) != len(disks):
        raise _bad(field, v, "a disk is named twice")
    return disks


def _machine(v: Any, field: str) -> str:
    if not isinstance(v, str) or not MACHINE.fullmatch(v):
        raise _bad(field, v, "a QEMU machine type such as pc-i440fx-8.2")
    return v


def _loopback(v: Any, field: str) -> str:
    """VNC listens where bcreate puts it, the host's loopback: a definition cannot open the
    console (with or without a password) on another address."""
    try:
        if isinstance(v, str) and ipaddress.IPv4Address(v).is_loopback:
            return v
    except ValueError:
        pass
    raise _bad(field, v, "a loopback address: cbsd serves VNC on 127.0.0.1 only")


def _hostfwd(v: Any, field: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(r, str) and "," not in r for r in v):
        raise _bad(field, v, "a list of rules PROTO:BIND:HOSTPORT:GUESTPORT")
    # bcreate's own parser: the same shapes, the same duplicates refused, stored as it stores.
    rules = parse_hostfwd(",".join(v))
    if len(rules) != len(v):
        raise _bad(field, v, "an empty rule")
    return rules


def _cloud_init(v: Any, field: str) -> dict[str, str]:
    if not isinstance(v, dict):
        raise _bad(field, v, "an object of ci_* settings")
    for key, value in v.items():
        if key not in CLOUD_INIT_KEYS and key not in CI_STORED:
            raise _bad(field, key, f"not a cloud-init key ({', '.join(CLOUD_INIT_KEYS)})")
        _text(value, f"{field}.{key}")
    return dict(v)


def _ifname(v: str, field: str) -> str:
    return check_ifname(v, field)


def _controllers(v: Any, field: str) -> dict[str, str]:
    if not isinstance(v, dict):
        raise _bad(field, v, "an object: disk file name -> controller")
    for disk, controller in v.items():
        _disk_file(disk, field)
        _enum(CONTROLLERS)(controller, f"{field}.{disk}")
    return dict(v)


# checkpoint_schedule=: cron's @ names or five cron fields in cron's characters. The shape
# only: the full check (croniter, core/manage/schedule.check_schedule) runs at bcreate/bset,
# not at every read of a definition, so bls does not load the cron parser.
CRON_NAMES = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")
_CRON_SHAPE = re.compile(r"[0-9A-Za-z*/,?#-]{1,64}(?: [0-9A-Za-z*/,?#-]{1,64}){4}")
# checkpoint_pattern=: name characters and the strftime fields of numbers only (so every
# name it gives is a checkpoint name); the longest it renders must fit in 64 characters.
_PATTERN = re.compile(r"(?:[A-Za-z0-9_-]|%[YmdHMSyjuwUWVG])+")
_WIDEST = time.struct_time((2026, 12, 31, 23, 59, 59, 3, 365, 0))


def check_schedule_shape(v: str, field: str) -> str:
    if v in CRON_NAMES or _CRON_SHAPE.fullmatch(" ".join(v.split())):
        return v
    raise _bad(field, v, f"a cron expression of 5 fields, or one of {', '.join(CRON_NAMES)}")


def render_pattern(pattern: str, when: float | time.struct_time) -> str:
    """A scheduled checkpoint's name: *pattern*'s strftime fields at *when* (local time)."""
    return time.strftime(pattern, when if isinstance(when, time.struct_time)
                         else time.localtime(when))


def check_pattern(v: str, field: str) -> str:
    if not isinstance(v, str) or not _PATTERN.fullmatch(v) or v.startswith(("_", "-")):
        raise _bad(field, v, "letters, digits, '_', '-' and the time fields %Y %m %d %H %M "
                   "%S %y %j %u %w %U %W %V %G, starting with a letter, digit or field")
    if len(render_pattern(v, _WIDEST)) > 64:
        raise _bad(field, v, "its names would be longer than 64 characters")
    return v


def _expiry(v: str, field: str) -> str:
    parse_duration(v, field)
    return v


def _interval(v: Any, field: str) -> str:
    if not isinstance(v, str):
        raise _bad(field, v, "an interval such as 30s or 5m")
    parse_interval(v, field)
    return v


def _node_or_empty(v: Any, field: str) -> str:
    if not isinstance(v, str):
        raise _bad(field, v, "a node name")
    return check_name(v, field) if v else v
def _nic(v: Any, field: str) -> Nic:
    if not isinstance(v, dict):
        raise _bad(field, v, "an object of nic_type, nic_hwaddr, nic_parent, hostfwd")
    unknown = sorted(str(k) for k in v if k not in NIC_FIELDS)
    if unknown:
        raise _bad(field, unknown[0], f"not a NIC key ({', '.join(NIC_FIELDS)})")
    return Nic(**{k: NIC_FIELDS[k](x, f"{field}.{k}") for k, x in v.items()})


def _nics(v: Any, field: str) -> list[Nic]:
    if not isinstance(v, list) or len(v) > MAX_NICS:
        raise _bad(field, v, f"a list of at most {MAX_NICS} NICs")
    return [_nic(n, f"{field}[{i + 1}]") for i, n in enumerate(v)]


# A NIC's keys (CBSD's bhyvenic names) and their rules; its relations: check_relations.
NIC_FIELDS: dict[str, Check] = {
    "nic_type": _enum(NIC_TYPES),
    "nic_hwaddr": _or_empty(check_mac),
    "nic_parent": _or_empty(_ifname),
    "hostfwd": _hostfwd,
}
# The keys a definition written before several NICs existed has for its one NIC, each with
# its rule and the NIC key it becomes: upgrade_nics() reads such a definition as one NIC.
LEGACY_NIC: dict[str, tuple[Check, str]] = {
    "nic": (_enum(NICS), "nic_type"),
    "mac": (_or_empty(check_mac), "nic_hwaddr"),
    "interface": (_or_empty(_ifname), "nic_parent"),
    "hostfwd": (_hostfwd, "hostfwd"),
}


def upgrade_nics(data: dict[str, Any]) -> dict[str, Any]:
    """A definition with the single-NIC keys (nic, mac, interface, hostfwd) as one with
    `nics` (nic=none: no NIC), read as written then upgraded, the way Ganeti upgrades its
    runtime files on read; the next write stores the new form. Each old key is checked by
    its old rule first, so a refusal names the key the definition holds."""
    old = {k: data[k] for k in LEGACY_NIC if k in data}
    if not old:
        return data
    for key, value in old.items():
        LEGACY_NIC[key][0](value, key)
    if "nics" in data:
        raise UsageError(f"both nics and {sorted(old)[0]} (an older definition's single-NIC "
                         "key): one or the other")
    rest = {k: v for k, v in data.items() if k not in old}
    if old.get("nic", "user") == "none":
        if old.get("hostfwd"):
            raise UsageError("hostfwd= needs nic=user")
        if old.get("interface"):
            raise UsageError("interface= needs nic=bridge")
        return {**rest, "nics": []}
    nic = {LEGACY_NIC[k][1]: v for k, v in old.items() if k != "nic"}
    return {**rest, "nics": [{"nic_type": old.get("nic", "user"), **nic}]}


# Every VMSpec field and its rule (tests/unit/test_spec_validation.py checks none is missing:
# a field added to VMSpec must say here what a definition may hold in it).
FIELDS: dict[str, Check] = {
    "jname": _name,
    "ram": _int(MIN_RAM, MAX_RAM),
    "cpus": _int(1, MAX_CPUS),
    "os_type": _enum(OS_TYPES),
    "machine": _machine,
    "disks": _disks,
    "iso": _optional(_path),
    "kernel": _optional(_path),
    "initrd": _optional(_path),
    "cmdline": _optional(_text),
    "vnc": _bool,
    "vnc_password": _optional(_text),
    "vnc_bind": _loopback,
    "nics": _nics,
    "astart": _bool,
    "guest_agent": _bool,
    "virtio_rnd": _bool,
    "efi": _enum(EFI_MODES),
    "cloud_init": _cloud_init,
    "disk_controllers": _controllers,
    "ram_file": _enum(AUTO_OFF),
    "dedup": _enum(AUTO_OFF),
    "genid": _enum(AUTO_OFF),
    "checkpoint_schedule": _or_empty(check_schedule_shape),
    "checkpoint_expiry": _or_empty(_expiry),
    "checkpoint_pattern": check_pattern,
    "checkpoint_live": _bool,
    "checkpoint_stopped": _bool,
    "ha": _bool,
    "ha_node": _node_or_empty,
    "ha_interval": _interval,
}
REQUIRED = ("jname", "ram")


def from_untrusted(data: Any, origin: str) -> VMSpec:
    """The VMSpec *data* describes (a JSON object as read), or UsageError (exit 2)
    "ORIGIN: bad value for KEY: ..." naming the first thing refused. Keys a definition lacks
    take VMSpec's defaults (what a VM defined before the setting existed had)."""
    try:
        if not isinstance(data, dict):
            raise UsageError(f"not a VM definition ({_show(data)})")
        data = upgrade_nics(data)
        unknown = sorted(str(k) for k in data if k not in FIELDS)
        if unknown:
            raise UsageError(f"unknown key {unknown[0]!r} (not a setting this cbsd has)")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise UsageError(f"no {missing[0]}")
        spec = VMSpec(**{k: FIELDS[k](v, k) for k, v in data.items()})
        check_relations(spec)
    except UsageError as e:
        raise UsageError(f"{origin}: {e}") from None
    return spec


def check_relations(spec: VMSpec) -> None:
    """The rules between keys that bcreate and bset apply too: UsageError naming the key."""
    if spec.ram < MIN_RAM:
        raise UsageError(f"vm_ram={spec.ram >> 20}m is under 16 MiB: a likely mistake "
                         "(sizes take a suffix, e.g. vm_ram=512m)")
    if (spec.initrd or spec.cmdline) and not spec.kernel:
        raise UsageError("initrd= and cmdline= need kernel=")
    if spec.vnc_password and not spec.vnc:
        raise UsageError("vnc_password= needs vnc=1")
    if spec.ha and not spec.ha_node:
        raise UsageError("ha=1 needs ha_node= (the standby cluster node)")
    check_nics(spec.nics)
    stray = sorted(set(spec.disk_controllers) - set(spec.disks))
    if stray:
        raise UsageError(f"bad value for disk_controllers: {stray[0]} is not one of the "
                         "VM's disks")


def with_first_nic(nics: list[Nic], *, fresh_mac: str, nic: str | None = None,
                   mac: str | None = None, interface: str | None = None,
                   hostfwd: list[str] | None = None) -> list[Nic]:
    """*nics* with bcreate's/bset's single-NIC keys applied to the first NIC (None: not
    given). nic=none removes the only NIC; a NIC made here gets *fresh_mac* unless mac= is
    given. The result is checked by check_relations where the spec is."""
    first = nics[0] if nics else None
    kind = nic or (first.nic_type if first else "none")
    if kind == "none":
        if len(nics) > 1:
            raise UsageError(f"nic=none: the VM has {len(nics)} NICs (detach them with "
                             "'cbsd bhyve-nic mode=detach')")
        if hostfwd:
            raise UsageError("hostfwd= needs nic=user")
        if interface:
            raise UsageError("interface= needs nic=bridge")
        if mac:
            raise UsageError("nic_hwaddr= needs a NIC (nic=user or nic=bridge)")
        return []
    base = first or Nic(nic_type=kind, nic_hwaddr=fresh_mac)
    new = Nic(nic_type=kind, nic_hwaddr=base.nic_hwaddr if mac is None else mac,
              nic_parent=base.nic_parent if interface is None else interface,
              hostfwd=list(base.hostfwd if hostfwd is None else hostfwd))
    return [new, *nics[1:]]


def check_nics(nics: list[Nic]) -> None:
    """The rules between a VM's NICs and their keys (bcreate's single-NIC keys name them as
    a user types them: hostfwd=, interface= for the first NIC)."""
    if len(nics) > MAX_NICS:
        raise UsageError(f"a VM has at most {MAX_NICS} NICs")
    for i, nic in enumerate(nics):
        first = i == 0
        if nic.hostfwd and nic.nic_type != "user":
            raise UsageError("hostfwd= needs nic=user" if first else
                             f"NIC {i + 1}: hostfwd= needs nic_type=user")
        if nic.nic_parent and nic.nic_type != "bridge":
            raise UsageError("interface= needs nic=bridge" if first else
                             f"NIC {i + 1}: nic_parent= needs nic_type=bridge")
    macs = [n.nic_hwaddr for n in nics if n.nic_hwaddr]
    twice = sorted({m for m in macs if macs.count(m) > 1})
    if twice:
        raise UsageError(f"bad value for nic_hwaddr: {twice[0]} is the MAC of two NICs")
    # QEMU's user networks all listen on the host: one port forwarded by two is refused
    # there, so here (parse_hostfwd names the port).
    parse_hostfwd(",".join(r for n in nics for r in n.hostfwd))
