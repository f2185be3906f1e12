"""Shell completion, from the registry (commands, keys, choices) and the inventory (VM and
checkpoint names). contrib/bash-completion/cbsd calls `cbsd __complete CURRENT WORDS...`.
Never fails: a completion that cannot be computed is simply empty."""

from __future__ import annotations

import contextlib

from cbsd.cli.table import COMMANDS

VM_KEYS = {"jname", "old"}


def candidates(current: str, words: list[str]) -> list[str]:
    if not words:
        return sorted(c for c in COMMANDS if c.startswith(current))
    cmd = COMMANDS.get(words[0])
    if cmd is None:
        return []
    key, eq, value = current.partition("=")
    if not eq:
        keys = [f"{k.name}=" for k in cmd.keys if k.name.startswith(current)]
        vms = [] if cmd.bare == "none" else _unregistered(current) if cmd.name == \
            "bregister" else _vms(current)
        return sorted(keys + vms)
    k = cmd.key(key)
    if k is None:
        return []
    if k.choices:
        return [f"{key}={c}" for c in k.choices if c.startswith(value)]
    if k.kind == "bool":
        return [f"{key}={v}" for v in ("0", "1") if v.startswith(value)]
    if key in VM_KEYS:
        names = _unregistered(value) if cmd.name == "bregister" else _vms(value)
        return [f"{key}={n}" for n in names]
    if key in ("checkpoint", "name", "snapname"):
        vm = next((w.split("=", 1)[1] for w in words if w.startswith(("jname=", "old="))),
                  next((w for w in words[1:] if "=" not in w), None))
        names = _snapshots(vm) if cmd.name == "bsnapshot" else _checkpoints(vm)
        return [f"{key}={n}" for n in names if n.startswith(value)]
    return []


def _vms(prefix: str) -> list[str]:
    with contextlib.suppress(Exception):
        # lazy: completing a command or key name needs no workdir
        from cbsd.core.vm.context import Context

        return [n for n in Context(writable=False).inventory.names() if n.startswith(prefix)]
    return []


def _unregistered(prefix: str) -> list[str]:
    """bregister's names: the VMs whose files are here without an inventory entry (after
    bunregister, or a lost inventory), not those the inventory lists."""
    with contextlib.suppress(Exception):
        # lazy: completing a command or key name needs no workdir
        from cbsd.core.manage.registry import unregistered

        # lazy: as above
        from cbsd.core.vm.context import Context

        return [n for n in unregistered(Context(writable=False)) if n.startswith(prefix)]
    return []


def _checkpoints(jname: str | None) -> list[str]:
    if not jname:
        return []
    with contextlib.suppress(Exception):
        # lazy: completing a command or key name needs no workdir
        from cbsd.core.vm.context import Context

        # lazy: only completing a checkpoint name
        from cbsd.storage import ckpstore

        ctx = Context(writable=False)
        return [ckpstore.state_name(p) for p, _ in
                ckpstore.list_states(ctx.workdir.checkpoints(jname))]
    return []


def _snapshots(jname: str | None) -> list[str]:
    if not jname:
        return []
    with contextlib.suppress(Exception):
        # lazy: only completing a snapshot name (qemu-img), which needs the workdir
        from cbsd.core.manage.snapshots import listing

        # lazy: completing a command or key name needs no workdir
        from cbsd.core.vm.context import Context

        return [r["snapname"] for r in listing(Context(writable=False), jname)]
    return []
