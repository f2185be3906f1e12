"""bset, bget, brename, bclone: a defined VM's settings, name and copies.

One table (SETTINGS) says how each CBSD key maps onto the VM's spec, for setting, showing
and --help alike. Every change is made to a stopped VM under its lock; the inventory is
written first and the definition beside the files (vm.json) right after, and recovery
rewrites vm.json from the inventory if a crash fell between the two.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cbsd import clock, specs
from cbsd.core.checkpoint.checkpoints import unrestorable_after
from cbsd.core.checkpoint.identity import CLONE_OF
from cbsd.core.manage import cloudinit, cron, lifecycle
from cbsd.core.manage.nics import new_mac, taken_macs, with_macs
from cbsd.core.vm.context import Context
from cbsd.core.vm.definition import RENAME_NOTE, finish_rename, save_spec_file
from cbsd.core.vm.machine import EFI_VARS, VM
from cbsd.core.vm.states import sweep_orphans
from cbsd.errors import CbsdError, StateError, UsageError
from cbsd.failpoints import failpoint
from cbsd.model import CLOUD_INIT_KEYS, HA_KEYS, SCHEDULE_KEYS, Action, VMSpec, require
from cbsd.names import check_name, format_size
from cbsd.qemu import img
from cbsd.specs import CI_STORED
from cbsd.storage import ckpstore
from cbsd.storage.atomic import write_atomic
from cbsd.storage.chunkstore import Recipe, Store


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str  # CBSD's name
    field: str  # VMSpec's
    show: Callable[[Any], Any] = lambda v: v
    # May change while the VM runs: nothing QEMU reads (a running VM's checkpoint schedule).
    live: bool = False
    first_nic: bool = False  # NIC 1's key (VMSpec's property of that name reads it)


def _secret(value: Any) -> str:
    return "(set)" if value else ""


SETTINGS = (
    Setting("vm_ram", "ram", format_size),
    Setting("vm_cpus", "cpus"),
    Setting("vm_os_type", "os_type"),
    Setting("vnc", "vnc"),
    Setting("vnc_password", "vnc_password", _secret),
    Setting("nic", "nic", first_nic=True),
    Setting("nic_hwaddr", "mac", first_nic=True),
    Setting("interface", "interface", first_nic=True),
    Setting("hostfwd", "hostfwd", lambda rules: ",".join(rules), first_nic=True),
    Setting("astart", "astart"),
    Setting("vm_efi", "efi"),
    Setting("virtio_rnd", "virtio_rnd"),
    Setting("vm_ramfile", "ram_file"),
    Setting("vm_dedup", "dedup"),
    Setting("vm_genid", "genid"),
    *(Setting(key, key, live=True) for key in SCHEDULE_KEYS),
    *(Setting(key, key, live=True) for key in HA_KEYS),
)
SETTABLE = {s.key for s in SETTINGS} | set(CLOUD_INIT_KEYS)
_LIVE = {s.key for s in SETTINGS if s.live}


def describe(spec: VMSpec) -> dict[str, Any]:
    """What bget shows: every setting by its CBSD name (secrets only as "(set)")."""
    out: dict[str, Any] = {"jname": spec.jname}
    out.update({s.key: s.show(getattr(spec, s.field)) for s in SETTINGS})
    for key in CLOUD_INIT_KEYS:
        value = spec.cloud_init.get(key)
        out[key] = _secret(value) if key.startswith("ci_user_pw_") else value
    out["machine"] = spec.machine
    out["disks"] = list(spec.disks)
    out["iso"], out["kernel"], out["initrd"], out["cmdline"] = (spec.iso, spec.kernel,
                                                                 spec.initrd, spec.cmdline)
    return out


def get(ctx: Context, jname: str) -> dict[str, Any]:
    return describe(ctx.spec(jname))


def set_(ctx: Context, jname: str, changes: dict[str, Any]) -> str:
    """Change a stopped VM's settings (*changes*: CBSD keys given on the command line); the
    checkpoint_* keys alone may change while it runs (Setting.live)."""
    if not changes:
        raise UsageError("bset: nothing to set (give key=value pairs, see 'cbsd bset --help')")
    with ctx.locked_vm(jname, "bset") as vm:
        if not set(changes) <= _LIVE:  # only a stopped VM's devices and settings change
            require(jname, vm.status(mine=True), Action.CONFIGURE)
        old = vm.spec
        fields: dict[str, Any] = {s.field: changes[s.key] for s in SETTINGS
                                  if s.key in changes and not s.first_nic}
        nic1 = {s.field: changes[s.key] for s in SETTINGS if s.key in changes and s.first_nic}
        if nic1:
            fields["nics"] = specs.with_first_nic(old.nics, fresh_mac=new_mac(taken_macs(ctx)),
                                                  **nic1)
        if any(k in changes for k in CLOUD_INIT_KEYS):
            given = {k: changes[k] for k in CLOUD_INIT_KEYS if k in changes}
            cleared = {k for k, v in given.items() if v == ""}  # ci_gw4= removes the key
            # The new instance id (from settings()) makes cloud-init apply the change.
            # The machine stays the same one: its identity_id stays (from bcreate or bclone).
            kept = {k: old.cloud_init[k] for k in ("identity_id",) if k in old.cloud_init}
            merged = {k: v for k, v in {**old.cloud_init, **cloudinit.settings(given),
                                        **kept}.items() if k not in cleared}
            fields["cloud_init"] = merged if set(merged) - set(CI_STORED) else {}
        new = dataclasses.replace(old, **fields)
        lifecycle.validate(new)
        lifecycle.check_host(ctx, new)
        wd = ctx.workdir
        if new.efi == "uefi" and not wd.disk(jname, EFI_VARS).exists():
            img.convert(Path(ctx.host.ovmf[0][1]), wd.disk(jname, EFI_VARS), source="raw")
        if new.cloud_init and new.cloud_init != old.cloud_init:
            cloudinit.write_seed(wd.seed(jname), cloudinit.documents(jname, new.cloud_init))
        failpoint("bset:prepared")
        ctx.inventory.update_spec(new)
        failpoint("bset:recorded")
        save_spec_file(ctx, new)
        if new.checkpoint_schedule != old.checkpoint_schedule:
            # A new schedule starts now: its first checkpoint is at its next slot, not at
            # a slot of the old one that it "missed".
            cron.record_run(wd, jname, clock.now())
    stale = unrestorable_after(ctx, jname, old, new)
    done = f"{jname}: set " + ", ".join(f"{k}={v}" for k, v in _shown(changes).items())
    if stale:
        done += (f" ({len(stale)} checkpoint(s) taken with the old settings cannot be restored "
                 "with these: 'cbsd bcheckpoint mode=list' shows why)")
    return done


def _shown(changes: dict[str, Any]) -> dict[str, Any]:
    by_key = {s.key: s for s in SETTINGS}
    return {k: ("(set)" if k in ("vnc_password", "ci_user_pw_user", "ci_user_pw_root") and v
                else by_key[k].show(v) if k in by_key else v) for k, v in changes.items()}


def rename(ctx: Context, old: str, new: str) -> str:
    """Rename a stopped VM with its disks, checkpoints and files.

    Crash-safe in three steps, each finished by recovery if cut short: a note in the VM's
    folder says where it is going (.rename-to); the inventory entry moves in one transaction;
    the folders move and the note goes. Until the entry moved, recovery drops the note; after,
    it moves the folders (core/vm/definition.finish_rename)."""
    check_name(new)
    if old == new:
        raise UsageError("brename: old= and new= are the same name")
    wd = ctx.workdir
    with ctx.lock(new, "brename"), ctx.locked_vm(old, "brename") as vm:
        require(old, vm.status(mine=True), Action.RENAME)
        if ctx.inventory.get(new) is not None:
            raise StateError(f"brename: VM already exist: {new}")
        taken = [p for p in (wd.system(new), wd.vm_dir(new)) if p.exists()]
        if taken:
            raise StateError(f"brename: files of a VM named {new} exist "
                             f"({', '.join(map(str, taken))}): move them away first")
        write_atomic(wd.system(old) / RENAME_NOTE, new.encode())
        failpoint("brename:noted")
        ctx.inventory.rename(old, dataclasses.replace(vm.spec, jname=new))
        failpoint("brename:recorded")
        finish_rename(ctx, old, new)
    return f"{old}: renamed to {new}"


PATTERN = "%d"  # in bclone's new= with count=N: replaced by 1..N


def clone_names(new: str, count: int | None) -> list[str]:
    """bclone's new names: *new* itself, or with count=N the pattern's N names (web%d ->
    web1..webN). UsageError (exit 2) for a pattern without count or count without one."""
    if count is None:
        check_name(new, "new")
        return [new]
    if new.count(PATTERN) != 1:
        raise UsageError(f"bclone: count= needs new= with one {PATTERN} for the number "
                         f"(e.g. new=web{PATTERN}), got '{new}'")
    names = [new.replace(PATTERN, str(i)) for i in range(1, count + 1)]
    for name in names:
        check_name(name, "new")
    return names


def clone(ctx: Context, old: str, new: str, checkpoint: str | None = None,
          count: int | None = None) -> list[str]:
    """Independent copies of a stopped VM: its disks (reflinked where the filesystem can),
    its settings, and for each a new MAC address and cloud-init identity; with *checkpoint*,
    that checkpoint too, so each copy can continue from its instant (and then gets a new
    network card and generation ID: core/checkpoint/identity.py, generation.py). All or
    nothing: every name is checked before anything is made, and the copies made are removed
    if a later one fails. -> the new names."""
    names = clone_names(new, count)
    wd = ctx.workdir
    taken = [n for n in names if ctx.inventory.get(n) is not None]  # before any lock: n may be old
    if taken:
        if count is None:
            raise StateError(f"VM already exist: {taken[0]}")
        raise UsageError(f"bclone: VM already exist: {', '.join(taken)} (nothing was cloned)")
    with ctx.locked_vm(old, "bclone") as vm:
        require(old, vm.status(mine=True), Action.CLONE)
        vm.check_images()  # a clone copies the images as they are: only self-contained ones
        source = None
        if checkpoint is not None:
            check_name(checkpoint, "checkpoint name")
            source = wd.checkpoint(old, checkpoint)
            if not source.is_dir() or source.is_symlink():
                raise StateError(f"{old}: no checkpoint {checkpoint}")
            ckpstore.verify_files(source, ckpstore.read_manifest(source))
        files = [str(p) for n in names for p in (wd.system(n), wd.vm_dir(n)) if p.exists()]
        if files and count is not None:
            raise UsageError(f"bclone: files of a VM by that name exist ({', '.join(files)}): "
                             "move them away first (nothing was cloned)")
        made: list[str] = []
        try:
            for name in names:
                _clone_one(ctx, vm, name, source)
                made.append(name)
        except BaseException:
            for name in made:  # all or nothing
                lifecycle.remove(ctx, name)
            raise
    return names


def _clone_one(ctx: Context, vm: VM, new: str, source: Path | None) -> None:
    wd = ctx.workdir
    spec = dataclasses.replace(
        vm.spec, jname=new, nics=with_macs(ctx, vm.spec.nics, renew=True),
        cloud_init=({**vm.spec.cloud_init, "instance_id": os.urandom(8).hex(),
                     "identity_id": os.urandom(8).hex()} if vm.spec.cloud_init else {}),
        astart=False)

    def make(_: Path) -> None:
        for image in vm.images():
            _copy(Path(image.path), wd.disk(new, image.name))
        if spec.cloud_init:
            cloudinit.write_seed(wd.seed(new), cloudinit.documents(new, spec.cloud_init))
        if source is not None:
            _copy_checkpoint(ctx, source, spec)
        failpoint("bclone:copied")

    lifecycle.create_from(ctx, spec, make)
    sweep_orphans(VM.load(ctx, new))  # snapshots of checkpoints not copied


def _copy(src: Path, dst: Path) -> None:
    """A copy that shares blocks where the filesystem can (cp --reflink=auto), sparse."""
    res = subprocess.run(["cp", "--reflink=auto", "--sparse=always", "--", str(src),
                          str(dst)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise CbsdError(f"cannot copy {src.name}: {res.stderr.strip() or 'cp failed'}")
    os.chmod(dst, 0o600)


def _copy_checkpoint(ctx: Context, source: Path, spec: VMSpec) -> None:
    """The checkpoint as the clone's own: its memory file copied, its manifest rewritten for
    the clone's name and definition and sealed again."""
    m = ckpstore.read_manifest(source)
    source_jname = m.jname
    final = ctx.workdir.checkpoint(spec.jname, m.name)
    tmp = ckpstore.new_tmpdir(final)
    for fname in m.files:  # memory, and the RAM file of a VM that has one (cloned if it can)
        if fname != ckpstore.RECIPE:
            _copy(source / fname, tmp / fname)
    if m.stream is not None:  # the original's chunk store stays its own: a plain stream

        Store(ckpstore.store_of(source)).rebuild(Recipe.read(source / ckpstore.RECIPE),
                                                 tmp / ckpstore.MEMORY)
        m.files = {**{k: v for k, v in m.files.items() if k != ckpstore.RECIPE},
                   ckpstore.MEMORY: m.stream}
        m.stream = None
    m.jname = spec.jname
    m.spec = {**m.spec, "jname": spec.jname}
    m.parent = None  # the clone has none of the original's other checkpoints
    # The guest in it is the original's: its restores renew machine-id and host keys
    m.migration = {**m.migration, CLONE_OF: m.migration.get(CLONE_OF) or source_jname}
    ckpstore.save_manifest(m, tmp)
    ckpstore.publish(tmp, final)

