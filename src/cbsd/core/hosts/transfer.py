"""bexport and bimport: a VM with its settings, disks, checkpoints and hibernation image as one
archive (storage/archive.py), and back, verified before anything is registered.

Export runs under the VM's lock on a stopped or hibernated VM, so nothing it reads changes; each
saved state's files are checked against the state's own manifest as they stream out (a damaged
checkpoint is not exported). Import streams the members into a staging folder of its own
(var/tmp/bimport-ID, locked while it is written), checks every checksum, the states' manifests
and this host's compatibility, and only then registers the VM by the same protocol bcreate
uses (core/manage/lifecycle.create_from): a damaged, truncated or altered archive, or a kill -9 at
any instant, leaves nothing registered and nothing the next bimport does not clear.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cbsd import specs
from cbsd.core.checkpoint import hibernate
from cbsd.core.checkpoint.compat import cpu_signature, host_incompatibility
from cbsd.core.checkpoint.load import incompatibility
from cbsd.core.hosts import staging
from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import ArchiveError, CheckpointError, StateError, UsageError
from cbsd.failpoints import failpoint
from cbsd.model import BOOT_MEDIA, Action, Status, VMSpec, require
from cbsd.names import check_name
from cbsd.qemu import img
from cbsd.qemu.host import machine_known
from cbsd.storage import ckpstore
from cbsd.storage.archive import FORMAT, HEADER, Reader, Source, Writer
from cbsd.storage.atomic import fsync_dir, write_atomic
from cbsd.storage.chunkstore import RECIPE, Recipe, Store, _closing
from cbsd.storage.paths import HIBERNATION_DIR

# Every member name an archive may hold; anything else is refused (no path is ever taken from
# an archive as it is).
_MEMBER = re.compile(r"(vm/[A-Za-z0-9][A-Za-z0-9._-]*|boot/(kernel|initrd|iso)|"
                     r"(checkpoints/[A-Za-z0-9][A-Za-z0-9_-]*\.ckp|hibernate\.ckp)/"
                     r"[A-Za-z0-9][A-Za-z0-9._-]*)")
NOT_STAGED = "nothing is staged as"


# --- export -------------------------------------------------------------------------------

@dataclass
class Plan:
    members: list[tuple[str, Source, str | None]] = field(default_factory=list)

    def add(self, name: str, src: Source, expect: str | None = None) -> None:
        self.members.append((name, src, expect))


def export(ctx: Context, jname: str, out: Callable[[], IO[bytes]],
           checkpoints: list[str] | None, *, suspend: bool = False) -> str:
    """Write the VM to the archive *out* opens (once the VM is known exportable).
    checkpoints: None for all, else the names to include. suspend: hibernate it first."""
    if suspend and status_of(ctx, jname) in (Status.ON, Status.PAUSED):
        hibernate.suspend(ctx, jname)
    with ctx.locked_vm(jname, "bexport") as vm:
        return write_archive(vm, out, checkpoints)


def write_archive(vm: VM, out: Callable[[], IO[bytes]], checkpoints: list[str] | None) -> str:
    """export() for a VM whose lock the caller holds."""
    jname = vm.jname
    status = vm.status(mine=True)
    require(jname, status, Action.EXPORT)
    try:
        head, plan = _plan(vm, checkpoints, status)
    except CheckpointError as e:
        raise CheckpointError(f"{jname}: {e} (bcheckpoint mode=verify)") from None
    write_plan(jname, head, plan, out())
    n = len([m for m in plan.members if m[0].endswith("/" + ckpstore.MANIFEST)])
    return f"{jname}: exported ({n} saved state{'s' if n != 1 else ''})"


def write_plan(jname: str, head: bytes, plan: Plan, stream: IO[bytes]) -> None:
    """The archive: *head*, then the members, each saved state's checked as it goes out."""
    # On a failure the archive just stops (no seal): any importer refuses it as truncated.
    writer = Writer(stream)
    writer.add_bytes(HEADER, head)
    for name, src, expect in plan.members:
        try:
            digest = writer.add(name, src)
        except CheckpointError as e:  # a folded stream's chunks, read as they go out
            raise CheckpointError(f"{jname}: {_state_of(name)} is damaged: {e} "
                                  "(bcheckpoint mode=verify)") from None
        if expect is not None and digest != expect:
            raise CheckpointError(f"{jname}: {name} does not match its checksum (the saved "
                                  "state is damaged: bcheckpoint mode=verify)")
    writer.close()
    stream.flush()


def _state_of(member: str) -> str:
    """The saved state an archive member belongs to, as messages name it."""
    top = member.split("/")
    if top[0] == "checkpoints":
        return f"checkpoint {top[1][:-4]}"
    return "the hibernation image" if top[0] == HIBERNATION_DIR else member


def status_of(ctx: Context, jname: str) -> Status:
    vm = VM.load(ctx, jname)
    try:
        return vm.status()
    finally:
        vm.close()


def _plan(vm: VM, selection: list[str] | None, status: Status) -> tuple[bytes, Plan]:
    wd, jname, plan = vm.ctx.workdir, vm.jname, Plan()
    for f in sorted(wd.vm_dir(jname).iterdir()):
        if f.is_file() and not f.is_symlink():
            plan.add(f"vm/{f.name}", Source(f.stat().st_size, f))
    for medium in BOOT_MEDIA:
        path = getattr(vm.spec, medium)
        if path:
            p = Path(path)
            if not p.is_file():
                raise StateError(f"{jname}: its {medium}= {path} is missing: cannot export")
            plan.add(f"boot/{medium}", Source(p.stat().st_size, p))
    states = {ckpstore.state_name(p): p for p, _ in ckpstore.list_states(wd.checkpoints(jname))}
    wanted = sorted(states) if selection is None else selection
    for name in wanted:
        if name not in states:
            raise StateError(f"{jname}: no checkpoint {name}")
    dirs = [(f"checkpoints/{n}.ckp", states[n]) for n in wanted]
    if status is Status.SUSPENDED:
        dirs.append((HIBERNATION_DIR, wd.hibernation(jname)))
    summary: dict[str, Any] = {}
    for prefix, ckdir in dirs:
        m = ckpstore.read_manifest(ckdir)
        add_state(plan, prefix, ckdir, m, set(wanted))
        summary[prefix] = {"qemu": m.qemu_version, "accel": m.accel, "machine": m.machine}
    host = vm.ctx.host
    head = {
        "format": FORMAT, "jname": jname, "spec": vm.spec.to_dict(), "status": status.value,
        "created": ckpstore.now_iso()[0], "checkpoints": wanted,
        "source": {"host": socket.gethostname(), "qemu": host.version, "accel": host.accel,
                   "cpu": cpu_signature(host)},
        "states": summary,
        "members": [[name, src.size] for name, src, _ in plan.members],
    }
    return json.dumps(head, indent=1, sort_keys=True).encode(), plan


def add_state(plan: Plan, prefix: str, ckdir: Path, m: ckpstore.Manifest,
               exported: set[str]) -> None:
    """The state's files; its manifest rewritten where what travels differs from what is
    stored (a folded stream goes as a plain `memory`; a parent not exported is dropped)."""
    files = dict(m.files)
    rebuilt = None
    if m.stream is not None:
        try:
            recipe = Recipe.read(ckdir / RECIPE)
        except CheckpointError as e:
            raise CheckpointError(f"{ckpstore.describe(ckdir)} is damaged: {e}") from None
        store = Store(ckpstore.store_of(ckdir))
        rebuilt = (m.stream, _pieces(store, recipe, m.stream.size))
        files.pop(RECIPE)
        files[ckpstore.MEMORY] = m.stream
        m.files, m.stream = files, None
    if m.parent is not None and m.parent not in exported:
        m.parent = None
    manifest = ckpstore.manifest_bytes(m)
    plan.add(f"{prefix}/{ckpstore.MANIFEST}", Source(len(manifest), pieces=(manifest,)))
    for fname, meta in sorted(files.items()):
        if rebuilt is not None and fname == ckpstore.MEMORY:
            plan.add(f"{prefix}/{fname}", Source(meta.size, pieces=rebuilt[1]),
                     meta.xxh3_128)
        else:
            plan.add(f"{prefix}/{fname}", Source(meta.size, ckdir / fname), meta.xxh3_128)


def _pieces(store: Any, recipe: Any, size: int) -> Any:
    with _closing() as fds:
        for _, _, data in store.checked(recipe, size, fds):
            yield data


# --- import -------------------------------------------------------------------------------

def import_(ctx: Context, inp: IO[bytes], new_name: str | None, *,
            stage: bool = False) -> tuple[str, str]:
    """Read an archive, verify it whole, and register its VM (as *new_name* if given).
    stage: leave it verified in its staging folder instead, for commit() (bmove).
    Returns (jname, staging id)."""
    try:
        return _import(ctx, inp, new_name, stage=stage)
    except UsageError as e:  # the archive's, or any other bad input (a name, jname=)
        raise type(e)(f"bimport: {e}: nothing was imported") from None


def _import(ctx: Context, inp: IO[bytes], new_name: str | None, *,
            stage: bool) -> tuple[str, str]:
    ctx.workdir.ensure()
    staging.sweep(ctx)
    reader = Reader(inp)
    head = reader.header()
    try:
        definition = head["spec"]
        members = {str(n): int(s) for n, s in head["members"]}
        source = dict(head["source"])
        states = {str(k): dict(v) for k, v in head.get("states", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ArchiveError(f"the archive's {HEADER} lacks what a cbsd export has") from None
    spec = _definition(definition, members)
    jname = check_name(new_name or spec.jname)
    check_members(members)
    why = host_incompatibility(ctx.host, spec, source, states)
    if why:
        raise StateError(f"{jname}: cannot import on this host: {why}")
    if ctx.inventory.get(jname) is not None:
        raise StateError(f"VM already exist: {jname} (bimport jname=NEW imports it under "
                         "another name)")
    folder, lock = staging.new(ctx)
    try:
        extract(reader, folder, members, "bimport:member")
        spec = _settle(ctx, folder, spec, jname, reader.sums)
        (folder / "spec.json").write_text(_json(spec.to_dict()))
        if stage:
            (folder / staging.STAGED).write_text(jname)
            return jname, folder.name[len(staging.PREFIX):]
        register(ctx, folder, spec)
        return jname, ""
    finally:
        if not (folder / staging.STAGED).exists():
            staging.drop(folder)
        os.close(lock)


def check_members(members: dict[str, int]) -> None:
    """Every member name one a cbsd export may hold (no path is taken as it is)."""
    bad = [n for n in members if not _MEMBER.fullmatch(n) or ".." in n]
    if bad:
        raise ArchiveError(f"the archive holds {bad[0]}, which no cbsd export has")


def extract(reader: Reader, folder: Path, members: dict[str, int], point: str) -> None:
    """Every member of the archive into *folder*, each listed (with its size) in *members*;
    the seal checked. *point*: the failpoint after each member."""
    for info in reader.members():
        if members.get(info.name) != info.size:
            raise ArchiveError(f"the archive holds {info.name} ({info.size} bytes), "
                               f"which its {HEADER} does not list so")
        dst = folder / info.name
        dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        reader.extract(info, dst)
        failpoint(point)
    reader.check_seal()
    missing = set(members) - set(reader.sums)
    if missing:
        raise ArchiveError(f"the archive lacks {', '.join(sorted(missing))}")


def _definition(data: Any, members: dict[str, int]) -> VMSpec:
    """The archive's definition, checked as bcreate checks its keys (cbsd/specs.py), and
    naming no file but the archive's own: each disk a member vm/NAME, each boot medium the
    member boot/MEDIUM that _settle puts in the VM's folder (never a path on this host)."""
    spec = _checked(data, "the archive's definition")
    for disk in spec.disks:
        if f"vm/{disk}" not in members:
            raise ArchiveError(f"the archive's definition names disk {disk}, which the "
                               "archive does not hold")
    for medium in BOOT_MEDIA:
        if getattr(spec, medium) is not None and f"boot/{medium}" not in members:
            raise ArchiveError(f"the archive's definition names {medium}={getattr(spec, medium)}"
                               f", which the archive does not hold (boot media come only from "
                               "the archive)")
    return spec


def _checked(data: Any, origin: str) -> VMSpec:
    try:
        return specs.from_untrusted(data, origin)
    except UsageError as e:
        raise ArchiveError(str(e)) from None  # bad input all the same; named as the archive's


def _json(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=1, sort_keys=True)


def _settle(ctx: Context, folder: Path, spec: VMSpec, jname: str,
            sums: dict[str, list[Any]]) -> VMSpec:
    """Check, in the staging folder, everything registering relies on: every image is a
    self-contained qcow2 qemu-img reads, every saved state matches its own sealed manifest (by
    the checksums just computed: nothing is read twice), the VM and the disk snapshots it
    needs; then drop disk snapshots no imported state owns and rename what must be renamed.
    Anything wrong is bad input (ArchiveError): register() only moves files."""
    wd = ctx.workdir
    boot = {m: str(wd.vm_dir(jname) / f"boot-{m}") for m in BOOT_MEDIA
            if (folder / "boot" / m).is_file()}
    spec = dataclasses.replace(spec, jname=jname, **boot)  # type: ignore[arg-type]
    check_states(ctx, folder, spec, sums, boot)
    return spec


def check_states(ctx: Context, folder: Path, spec: VMSpec, sums: dict[str, list[Any]],
                 boot: dict[str, str]) -> dict[str, img.ImageInfo]:
    """_settle's checks of the folder's images and saved states, for the VM *spec* (boot:
    its boot media's new paths, for the states' copies of the definition); the images."""
    jname = spec.jname
    images = staging.check_images(ctx.workdir, folder, spec)
    owned = staging.check_snapshots(_state_dirs(folder), images)
    for ckdir in _state_dirs(folder):
        prefix = str(ckdir.relative_to(folder))
        m = ckpstore.read_manifest(ckdir)
        # Its copy of the definition is read later (bcheckpoint mode=list, bregister of a VM
        # without vm.json): checked as the archive's own is.
        _checked(m.spec, f"the archive's {ckpstore.describe(ckdir)}")
        for fname, meta in m.files.items():
            if sums.get(f"{prefix}/{fname}") != [meta.size, meta.xxh3_128]:
                raise ArchiveError(f"the archive's {ckpstore.describe(ckdir)} is damaged: "
                                   f"{fname} does not match its manifest")
        if m.stream is not None:
            raise ArchiveError(f"the archive's {ckpstore.describe(ckdir)} has no stream")
        why = incompatibility(m, spec.restore_relevant(), m.accel, ctx.host.version,
                              lambda machine: machine_known(ctx.host, machine))
        if why:
            raise StateError(f"{jname}: {ckpstore.describe(ckdir)} {why}")
        if m.jname != jname or m.spec.get("jname") != jname:
            m.jname, m.spec = jname, {**m.spec, "jname": jname, **boot}
            ckpstore.save_manifest(m, ckdir)
    staging.drop_orphans(folder, images, owned)  # snapshots of checkpoints not exported
    return images


def _state_dirs(folder: Path) -> list[Path]:
    dirs = sorted((folder / "checkpoints").glob("*.ckp")) if \
        (folder / "checkpoints").is_dir() else []
    if (folder / HIBERNATION_DIR).is_dir():
        dirs.append(folder / HIBERNATION_DIR)
    return dirs


def register(ctx: Context, folder: Path, spec: VMSpec) -> None:
    """Move a verified staging folder's files into place and register the VM (bcreate's
    protocol: a kill -9 in between leaves files under the unfinished mark, nothing more).
    Everything was checked in the folder (_settle): nothing here can refuse the VM."""
    wd, jname = ctx.workdir, spec.jname

    def make(_: Path) -> None:
        for f in sorted((folder / "vm").iterdir()):
            os.rename(f, wd.disk(jname, f.name))
        for m in BOOT_MEDIA:
            if (folder / "boot" / m).is_file():
                os.rename(folder / "boot" / m, wd.disk(jname, f"boot-{m}"))
        fsync_dir(wd.vm_dir(jname))
        for ckdir in _state_dirs(folder):
            dst = (wd.hibernation(jname) if ckdir.name == HIBERNATION_DIR
                   else wd.checkpoint(jname, ckdir.name[:-4]))
            os.rename(ckdir, dst)
        fsync_dir(wd.checkpoints(jname))
        fsync_dir(wd.system(jname))

    lifecycle.create_from(ctx, spec, make)


def commit(ctx: Context, ident: str) -> str:
    """Register a VM staged by bimport mode=stage; its name. Idempotent: a VM already
    committed from this staging folder is reported, not imported twice."""
    path = staging.staged(ctx, ident)
    with staging.held(path) as done:
        if done is not None:
            return done
        if not (path / staging.STAGED).exists():
            raise StateError(f"bimport: {NOT_STAGED} {ident}")
        spec = specs.from_untrusted(json.loads((path / "spec.json").read_text()),
                                    f"bimport: the definition staged in {path}")
        register(ctx, path, spec)
        failpoint("bimport:registered")  # registered, not yet noted: abort tells (below)

        write_atomic(staging.done_record(path), spec.jname.encode())
        staging.drop(path)
    return spec.jname


def abort(ctx: Context, ident: str) -> str:
    """Drop a staged VM unless it was committed: 'aborted', or 'committed NAME'."""
    path = staging.staged(ctx, ident)
    with staging.held(path) as done:
        staged_vm = path / "vm"
        if done is None and (path / staging.STAGED).exists() and not (
                staged_vm.is_dir() and any(staged_vm.iterdir())):
            # A commit killed after registering and before it noted so (register() moves
            # the files out and leaves their folder: empty, not gone).
            name = (path / staging.STAGED).read_text()
            done = name if ctx.inventory.get(name) is not None else None
        if done is not None:
            return f"committed {done}"
        staging.drop(path)
    return "aborted"
