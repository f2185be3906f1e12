"""CBSD-style arguments: ``key=value`` pairs in any order; bare words are VM names.

Every key a command takes is declared here with its kind; anything else is a UsageError (exit 2)
naming the key. Pure functions: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cbsd.errors import UsageError
from cbsd.names import check_ifname, check_mac, check_mask, check_name, parse_hostfwd, parse_size

_BOOL = {"1": True, "0": False, "yes": True, "no": False, "true": True, "false": False,
         "on": True, "off": False}
_KEY_RE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # name mask size int bool enum path str hostfwd list mac ifname
    default: Any = None
    required: bool = False
    help: str = ""
    choices: tuple[str, ...] = ()
    lo: int = 0
    hi: int = 1 << 30
    alias_of: str | None = None  # e.g. suspend= is CBSD's newer name for poweroff=


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    keys: tuple[Key, ...]
    example: str
    # What bare words are: "masks" (any number), "one", "none", "one-then-words" (a VM
    # name, then words the command reads: bget's setting names, bexec's command), or "words"
    # (all read by the command: bscp's SRC DST).
    bare: str = "masks"
    details: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # Reads only (no lock, nothing written): works on a read-only or full workdir. For a
    # command with modes, the modes that only read.
    readonly: bool = False
    readonly_modes: tuple[str, ...] = ()

    def writes(self, args: dict[str, Any]) -> bool:
        return not (self.readonly or args.get("mode") in self.readonly_modes)

    def key(self, name: str) -> Key | None:
        return next((k for k in self.keys if k.name == name), None)


def convert(cmd: Command, key: Key, raw: str) -> Any:
    what = key.name
    if key.kind == "name":
        return check_name(raw, what)
    if key.kind == "mask":
        return check_mask(raw, what)
    if key.kind == "size":
        return parse_size(raw, what)
    if key.kind == "bool":
        if raw.lower() not in _BOOL:
            raise UsageError(f"{cmd.name}: bad value for {what}: '{raw}' (use 0 or 1)")
        return _BOOL[raw.lower()]
    if key.kind == "int":
        if not re.fullmatch(r"[0-9]+", raw) or not key.lo <= int(raw) <= key.hi:
            raise UsageError(f"{cmd.name}: bad value for {what}: '{raw}' (a whole number "
                             f"from {key.lo} to {key.hi})")
        return int(raw)
    if key.kind == "enum":
        if raw not in key.choices:
            raise UsageError(f"{cmd.name}: bad value for {what}: '{raw}' (one of: "
                             f"{', '.join(key.choices)})")
        return raw
    if key.kind in ("path", "str"):
        if key.kind == "path" and not raw:
            raise UsageError(f"{cmd.name}: {what}= needs a path")
        if "\0" in raw:
            raise UsageError(f"{cmd.name}: bad value for {what}: contains a NUL byte")
        return raw
    if key.kind == "hostfwd":
        return _prefixed(cmd, parse_hostfwd, raw)
    if key.kind == "ifname":
        if raw == "":
            return ""  # cleared: the default (bset interface= goes back to cbsd0)
        return _prefixed(cmd, check_ifname, raw, what)
    if key.kind == "mac":
        return _prefixed(cmd, check_mac, raw, what)
    if key.kind == "list":
        items = [x.strip().lower() for x in raw.split(",") if x.strip()]
        bad = [x for x in items if x not in key.choices]
        if bad or not items:
            raise UsageError(f"{cmd.name}: bad value for {what}: '{','.join(bad) or raw}' "
                             f"(choose from: {','.join(key.choices)})")
        return items
    raise AssertionError(key.kind)


def _prefixed(cmd: Command, check: Callable[..., Any], *args: str) -> Any:
    """A pure check shared with definitions from outside (cbsd/specs.py), its message
    prefixed with the command."""
    try:
        return check(*args)
    except UsageError as e:
        raise UsageError(f"{cmd.name}: {e}") from None


def parse(cmd: Command, argv: list[str]) -> dict[str, Any]:
    """-> {key: value} with defaults filled in. ``jname=`` and bare words both name VMs: for
    commands on many VMs they land in "names" (masks allowed), else in "jname"."""
    out: dict[str, Any] = {}
    names: list[str] = []
    for word in argv:
        key_s, eq, raw = word.partition("=")
        if not eq:
            if cmd.bare == "words" or (cmd.bare == "one-then-words" and names):
                # bscp's SRC DST, bexec's command words (`ls -l`): the command reads them
                names.append(word)
                continue
            if word.startswith("-"):
                raise UsageError(f"{cmd.name}: unknown option '{word}' (arguments are key=value; "
                                 f"see 'cbsd {cmd.name} --help')")
            if cmd.bare == "none":
                raise UsageError(f"{cmd.name}: unexpected argument '{word}' (arguments are "
                                 "key=value)")
            names.append(word)
            continue
        key = cmd.key(key_s) if _KEY_RE.fullmatch(key_s) else None
        if key is None:
            valid = ", ".join(k.name for k in cmd.keys)
            raise UsageError(f"{cmd.name}: unknown key '{key_s}' "
                             + (f"(valid keys: {valid})" if valid else "(it takes none)"))
        if key.name == "jname":
            names.append(raw)
            continue
        target = key.alias_of or key.name
        if target in out:
            raise UsageError(f"{cmd.name}: key '{target}' given twice")
        out[target] = convert(cmd, cmd.key(target) or key, raw)
    jname = cmd.key("jname")
    if cmd.bare == "one-then-words":
        # `bget vm1 vm_ram vm_cpus`: the VM first (unless jname= named it), then words.
        given = [w for w in argv if w.startswith("jname=")]
        if not given and names:
            names, out["extra"] = names[:1], names[1:]
        else:
            names, out["extra"] = names[:len(given)], names[len(given):]
    if cmd.bare == "words":
        out["extra"], names = names, []
    if cmd.bare in ("one", "one-then-words"):
        if len(names) > 1:
            raise UsageError(f"{cmd.name}: takes one VM name, got {len(names)}")
        if names:
            out["jname"] = check_name(names[0])
    else:
        out["names"] = [check_mask(n) for n in names]
    for key in cmd.keys:
        if key.alias_of or key.name in out or (key.name == "jname" and names):
            continue
        if key.required:
            hint = " (a VM name or mask)" if key.kind == "mask" else ""
            raise UsageError(f"{cmd.name}: missing required key '{key.name}'{hint}")
        if key is not jname:
            out[key.name] = key.default
    return out


def help_text(cmd: Command) -> str:
    lines = [f"usage: cbsd {cmd.name} " + " ".join(
        (f"{k.name}=..." if k.required else f"[{k.name}=...]") for k in cmd.keys if not k.alias_of),
        "", cmd.summary, ""]
    if cmd.details:
        lines += [cmd.details, ""]
    lines.append("keys:")
    for k in cmd.keys:
        if k.alias_of:
            lines.append(f"  {k.name:<14} alias of {k.alias_of}=")
            continue
        default = "required" if k.required else f"default: {show_value(k.default)}"
        choices = f" ({'|'.join(k.choices)})" if k.choices and k.kind == "enum" else ""
        lines.append(f"  {k.name:<14} {k.help}{choices} [{default}]")
    lines += ["", "example:", f"  {cmd.example}"]
    return "\n".join(lines)


def show_value(v: Any, none: str = "none") -> str:
    """A value as the user would type it (bools 1/0, lists comma-separated); *none* for
    no value (help says "none", bget prints nothing)."""
    if v is None:
        return none
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, list):
        return ",".join(map(str, v)) or none
    return str(v)
