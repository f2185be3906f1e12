"""bcheckpoint: create, list, destroy, destroyall, verify (restore is bstart checkpoint=)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from stat import S_ISDIR
from typing import Any

from cbsd.core.checkpoint import fold, load, save, tree
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.core.vm.states import drop_state_and_sweep
from cbsd.errors import CheckpointError
from cbsd.model import Action, VMSpec, require, settings_part
from cbsd.names import check_name
from cbsd.qemu.host import machine_known
from cbsd.storage import ckpstore
from cbsd.storage.paths import Workdir


def create(ctx: Context, jname: str, name: str, *, poweroff: bool = False, live: bool = False,
           keep: int | None = None, progress: save.Progress | None = None) -> str:
    """Save a checkpoint; with *keep*, then delete the oldest so that *keep* remain (only once
    the new one is safely published)."""
    check_name(name, "checkpoint name")
    with ctx.locked_vm(jname, "bcheckpoint create") as vm:
        done = create_held(vm, name, poweroff=poweroff, live=live, keep=keep,
                           progress=progress)
    return after_create(ctx, jname, done)


def create_held(vm: VM, name: str, *, poweroff: bool = False, live: bool = False,
                keep: int | None = None, progress: save.Progress | None = None,
                stamp: save.Stamp | None = None,
                along: save.Along | None = None) -> tuple[str, bool]:
    """create()'s work on a VM whose lock the caller holds (bcheckpoint, the schedule's run):
    (what to say, whether to fold), for after_create once the lock is released."""
    wd, jname = vm.ctx.workdir, vm.jname
    check_name(name, "checkpoint name")
    require(jname, vm.status(mine=True), Action.CHECKPOINT)
    final = wd.checkpoint(jname, name)
    replaced = _parent_of(final)
    save.save(vm, final, name=name, kind="checkpoint", live=live,
              keep_running=not poweroff, progress=progress, stamp=stamp, along=along)
    if replaced is not None:  # the old state of that name is gone: its children move up
        tree.reparent(wd, jname, name, replaced[0])
    if not poweroff:
        tree.set_current(wd, jname, name)
    removed = []
    if keep is not None:
        names = [ckpstore.state_name(p) for p, _ in ckpstore.list_states(wd.checkpoints(jname))]
        for old in tree.beyond_keep(names, keep, name):
            drop(vm, old)
            removed.append(old)
    if poweroff:
        vm.power_off()
    gone = (f"\n{jname}: keep={keep}: removed the oldest checkpoint(s): {', '.join(removed)}"
            if removed else "")
    dedup = vm.spec.dedup == "auto" and bool(fold.foldable(wd, jname))
    return f"Checkpoint was created!: {final}{gone}", dedup


def after_create(ctx: Context, jname: str, done: tuple[str, bool]) -> str:
    """Once the lock is released: the fold helper, which takes the lock (and gives way to
    commands), if create_held says so. Returns what to say."""
    message, dedup = done
    if dedup:
        fold.start_helper(ctx.workdir, jname)
    return message


def _parent_of(ckdir: Path) -> tuple[str | None] | None:
    """(parent,) of an existing, readable checkpoint; None if there is none."""
    if not ckpstore.has_manifest(ckdir):
        return None
    try:
        return (ckpstore.read_manifest(ckdir).parent,)
    except CheckpointError:
        return (None,)


def drop(vm: VM, name: str) -> None:
    """Delete one checkpoint (lock held: bcheckpoint, the schedule's expiry); its children
    and the VM move up to its parent."""
    wd = vm.ctx.workdir
    final = wd.checkpoint(vm.jname, name)
    parent = _parent_of(final)
    drop_state_and_sweep(vm, final)
    tree.reparent(wd, vm.jname, name, parent[0] if parent else None)


def unrestorable_after(ctx: Context, jname: str, old: VMSpec, new: VMSpec) -> list[str]:
    """The checkpoints a definition change (bset, bhyve-nic) makes unrestorable: they match
    *old*'s devices and not *new*'s (mode=list says why; changing back restores them)."""
    return [m.name for _, m in ckpstore.list_states(ctx.workdir.checkpoints(jname))
            if m is not None and settings_part(m.restore_relevant) != new.restore_relevant()
            and settings_part(m.restore_relevant) == old.restore_relevant()]



# In the VM's system folder: the replication chain (core/cluster/ship.py writes it once the
# standby acknowledged a generation): {"node", "generation", "chain": [[G, base], ...]}.
REPLICATED = "replicated.json"


def replicated(wd: Workdir, jname: str) -> dict[str, Any]:
    try:
        data = json.loads((wd.system(jname) / REPLICATED).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _chain(rep: dict[str, Any], name: str) -> str | None:
    """mode=list's note on the checkpoint the standby has: its node and generation, then
    each generation it was shipped on (newest first; 'full': shipped whole)."""
    if name != f"ha-{rep.get('generation')}":
        return None
    try:
        links = [f"{g} on {b}" if b else f"{g} full" for g, b in reversed(rep["chain"])]
    except (KeyError, TypeError, ValueError):
        links = []
    return f"on {rep.get('node')} as generation {rep.get('generation')} ({', '.join(links)})"


def listing(ctx: Context, jname: str) -> list[dict[str, Any]]:
    """Each checkpoint with what restore would say of it now (restorable, and why not)."""
    spec = ctx.spec(jname)
    host = ctx.host
    relevant = spec.restore_relevant()
    rep = replicated(ctx.workdir, jname)
    out = []
    for path, m in ckpstore.list_states(ctx.workdir.checkpoints(jname)):
        name = ckpstore.state_name(path)
        try:
            size = ckpstore.state_size(path)
        except FileNotFoundError:
            continue  # destroyed while we listed
        if m is None:
            out.append({"name": name, "created": None, "size": size, "damaged": True,
                        "restorable": False, "why_not": "damaged (bcheckpoint mode=verify)"})
            continue
        out.append({
            "name": name,
            "created": m.created,
            "size": size,
            "ram_mb": m.spec["ram"] >> 20,
            "was_running": m.was_running,
            "live": m.live,
            "qemu_version": m.qemu_version,
            "machine": m.machine,
            "parent": m.parent,
            # Where its RAM is: a clone of the VM's RAM file, the chunk store, or its stream.
            "stored": "ram-file" if m.ram_file else "chunks" if m.folded else "stream",
            "damaged": False,
            # Taken by checkpoint_schedule= and when the schedule destroys it (None: never).
            "scheduled": m.scheduled,
            "expires": iso_time(m.expires_ts),
            "replicated": _chain(rep, name),
            **_restorable(load.incompatibility(m, relevant, host.accel, host.version,
                                               lambda t: machine_known(host, t))),
        })
    return out


def tree_lines(ctx: Context, jname: str, listed: list[dict[str, Any]]) -> list[str]:
    """mode=list's text: the checkpoints as a tree, '*' at the one the running VM descends
    from, and why a checkpoint cannot be restored now."""
    states = [(ck["name"], ck.get("parent"),
               (f" (expires {ck['expires']})" if ck.get("expires") else "")
               + (f" (replicated {ck['replicated']})" if ck.get("replicated") else "")
               + (" (damaged)" if ck["damaged"] else "" if ck["restorable"]
                  else f" (not restorable now: {ck['why_not']})")) for ck in listed]
    return tree.render(states, tree.current(ctx.workdir, jname))


def iso_time(ts: float | None) -> str | None:
    """A time as mode=list shows it: ISO 8601, UTC, to the minute (None stays None)."""
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(ts))


def _restorable(why: str | None) -> dict[str, Any]:
    return {"restorable": why is None, "why_not": why}


def destroy(ctx: Context, jname: str, name: str) -> str:
    check_name(name, "checkpoint name")
    with ctx.locked_vm(jname, "bcheckpoint destroy") as vm:
        final = ctx.workdir.checkpoint(jname, name)
        if not final.is_dir() or final.is_symlink():
            raise CheckpointError(f"{jname}: no checkpoint {name}")
        drop(vm, name)
    return f"{jname}: checkpoint {name} destroyed"


def destroyall(ctx: Context, jname: str) -> str:
    with ctx.locked_vm(jname, "bcheckpoint destroyall") as vm:
        states = ckpstore.list_states(ctx.workdir.checkpoints(jname))
        for path, _ in states:
            drop_state_and_sweep(vm, path)
        if states:
            tree.set_current(ctx.workdir, jname, None)
    return f"{jname}: {len(states)} checkpoint(s) destroyed"


def verify(ctx: Context, jname: str, name: str | None = None) -> list[tuple[str, str | None]]:
    """[(checkpoint, None if intact else what is wrong)].

    Runs without the VM's lock (a long verify must not make the VM busy), so another command
    may destroy or replace a checkpoint meanwhile. A finding counts only if the checkpoint is
    still the one that was read (same directory, by inode) and its disk snapshots were read
    after it was listed; otherwise that checkpoint is read again, or left out once gone."""
    vm = VM.load(ctx, jname)
    if name is not None:
        check_name(name, "checkpoint name")
        names = [name]
    else:
        names = [ckpstore.state_name(p)
                 for p, _ in ckpstore.list_states(ctx.workdir.checkpoints(jname))]
    results: list[tuple[str, str | None]] = []
    for ck in names:
        verdict = _verify_one(vm, ctx.workdir.checkpoint(jname, ck))
        if verdict is _GONE:
            if name is not None:
                raise CheckpointError(f"{jname}: no checkpoint {name}")
            continue
        results.append((ck, verdict))
    return results


_GONE = "gone"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None

    return (st.st_dev, st.st_ino) if S_ISDIR(st.st_mode) else None


def _verify_one(vm: VM, path: Path, tries: int = 3) -> str | None:
    for _ in range(tries):
        before = _identity(path)
        if before is None:
            return _GONE  # absent, a symlink or a file: no checkpoint by that name
        present = load.disk_snapshots(vm)
        try:
            load.check_intact(path, ckpstore.read_manifest(path), present)
            return None
        except (CheckpointError, OSError) as e:
            # A file that vanished while it was read is damage only if the checkpoint is
            # still the one we started with.
            if _identity(path) == before:
                if isinstance(e, OSError):
                    return f"{ckpstore.describe(path)} is damaged: {e.strerror or e}"
                return str(e)
            # Destroyed or replaced while it was read: read it again under its new identity.
    return None if _identity(path) is None else "it kept changing while it was verified"
