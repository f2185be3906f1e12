"""bcheckpoint: create, list, destroy, destroyall, verify (restore is bstart checkpoint=)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cbsd.core import savestate
from cbsd.core.context import Context
from cbsd.core.model import Action, require
from cbsd.core.names import check_name
from cbsd.core.vm import VM
from cbsd.errors import CheckpointError
from cbsd.storage import ckpstore


def create(ctx: Context, jname: str, name: str, *, poweroff: bool = False, live: bool = False,
           progress: savestate.Progress | None = None) -> str:
    check_name(name, "checkpoint name")
    with ctx.locked_vm(jname, "bcheckpoint create") as vm:
        require(jname, vm.status(mine=True), Action.CHECKPOINT)
        final = ctx.workdir.checkpoint(jname, name)
        savestate.save(vm, final, name=name, kind="checkpoint", live=live,
                       keep_running=not poweroff, progress=progress)
        if poweroff:
            vm.power_off()
    return f"Checkpoint was created!: {final}"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def listing(ctx: Context, jname: str) -> list[dict[str, Any]]:
    ctx.spec(jname)
    out = []
    for path, m in ckpstore.list_states(ctx.workdir.checkpoints(jname)):
        name = ckpstore.state_name(path)
        if m is None:
            out.append({"name": name, "created": None, "size": _size(path), "damaged": True})
            continue
        out.append({
            "name": name,
            "created": m.created,
            "size": _size(path),
            "ram_mb": m.data["spec"]["ram"] >> 20,
            "was_running": m.data["was_running"],
            "live": m.data["live"],
            "qemu_version": m.data["qemu_version"],
            "machine": m.data["machine"],
            "damaged": False,
        })
    return out


def destroy(ctx: Context, jname: str, name: str) -> str:
    check_name(name, "checkpoint name")
    with ctx.locked_vm(jname, "bcheckpoint destroy") as vm:
        final = ctx.workdir.checkpoint(jname, name)
        if not final.is_dir():
            raise CheckpointError(f"{jname}: no checkpoint {name}")
        savestate.drop(vm, final)
    return f"{jname}: checkpoint {name} destroyed"


def destroyall(ctx: Context, jname: str) -> str:
    with ctx.locked_vm(jname, "bcheckpoint destroyall") as vm:
        states = ckpstore.list_states(ctx.workdir.checkpoints(jname))
        for path, _ in states:
            savestate.drop(vm, path)
    return f"{jname}: {len(states)} checkpoint(s) destroyed"


def verify(ctx: Context, jname: str, name: str | None = None) -> list[tuple[str, str | None]]:
    """[(checkpoint, None if intact else what is wrong)]."""
    vm = VM.load(ctx, jname)
    if name is not None:
        check_name(name, "checkpoint name")
        path = ctx.workdir.checkpoint(jname, name)
        if not path.is_dir():
            raise CheckpointError(f"{jname}: no checkpoint {name}")
        paths = [path]
    else:
        paths = [p for p, _ in ckpstore.list_states(ctx.workdir.checkpoints(jname))]
    present = savestate.disk_snapshots(vm)
    results: list[tuple[str, str | None]] = []
    for path in paths:
        ck = ckpstore.state_name(path)
        try:
            savestate.check_intact(vm, path, ckpstore.read_manifest(path), present)
            results.append((ck, None))
        except CheckpointError as e:
            results.append((ck, str(e)))
    return results
