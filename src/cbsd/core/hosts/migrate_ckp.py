"""bmigrate's checkpoints: every saved state and the disk snapshots it owns, carried to the node
before the disks are mirrored (core/hosts/migrate.py has the whole protocol).

A checkpoint's disk state is an internal qcow2 snapshot inside the VM's own disk image, which
QEMU's mirror does not copy (it copies the active layer). So, while the guest runs on:
  here:  for each image, a new qcow2 of the same size is built in a scratch folder: for each
         snapshot a checkpoint owns, the snapshot's contents written over its active layer
         (read from the image in use: a snapshot never changes while it exists) and then
         snapshotted under the same tag; at last its active layer is made empty again (an
         empty snapshot taken first is applied and deleted). The images and the checkpoint
         folders go as a bexport archive (storage/archive.py: every member checksummed,
         sealed) over the control ssh, right after the request.
  node:  extracts it into a folder inside the VM's new folder (under its unfinished mark),
         checks it as bimport checks an archive (transfer.check_states: self-contained images,
         each state's manifest, checksums and disk snapshots, this host's compatibility), and
         takes the images as the VM's disks: the mirror then fills their active layer (as it
         fills an empty disk today), the snapshots beside it untouched.
The checkpoints cannot change meanwhile: bmigrate holds the VM's lock, which every command
that makes or deletes a saved state takes. Nothing is registered on the node before "go", so a
bmigrate cut short at any step leaves it all on this host (the scratch folder is a hidden
temporary folder that the next command's recovery removes, ckpstore.settle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, cast

from cbsd.core.hosts import transfer
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import ArchiveError, CheckpointError
from cbsd.failpoints import failpoint
from cbsd.model import VMSpec
from cbsd.qemu import img
from cbsd.storage import ckpstore
from cbsd.storage.archive import FORMAT, Reader, Source
from cbsd.storage.atomic import fsync_dir, remove_tree

BLANK = "cbsd-bmigrate-blank"  # the empty snapshot that empties a built image's active layer
INCOMING = "bmigrate-in"  # on the node, in the VM's system folder (under the unfinished mark)


def states(vm: VM) -> dict[str, Path]:
    """The VM's published checkpoints, by name."""
    found = ckpstore.list_states(vm.ctx.workdir.checkpoints(vm.jname))
    return {ckpstore.state_name(p): p for p, _ in found}


# --- this side ----------------------------------------------------------------------------

def send(vm: VM, out: IO[bytes]) -> None:
    """Every checkpoint of *vm* (its lock held) and its disk snapshots, as an archive to *out*."""
    wd, jname = vm.ctx.workdir, vm.jname
    scratch = ckpstore.new_tmpdir(wd.system(jname) / "bmigrate.ckp")
    try:
        named = states(vm)
        try:
            manifests = {n: ckpstore.read_manifest(p) for n, p in named.items()}
        except CheckpointError as e:
            raise CheckpointError(f"{jname}: {e} (bcheckpoint mode=verify)") from None
        owned = {s.tag for m in manifests.values() for s in m.disk_snapshots}
        plan = transfer.Plan()
        for image in vm.images():
            built = scratch / image.name
            _build(Path(image.path), built, owned)
            plan.add(f"vm/{image.name}", Source(built.stat().st_size, built))
        for name in sorted(named):
            transfer.add_state(plan, f"checkpoints/{name}.ckp", named[name], manifests[name],
                               set(named))
        failpoint("bmigrate:built")
        head = {"format": FORMAT, "jname": jname, "checkpoints": sorted(named),
                "members": [[n, src.size] for n, src, _ in plan.members]}
        transfer.write_plan(jname, json.dumps(head).encode(), plan,
                           cast(IO[bytes], _Paced(out)))
    finally:
        remove_tree(scratch)


def _build(src: Path, dst: Path, owned: set[str]) -> None:
    """A qcow2 of *src*'s size holding each of its snapshots in *owned*, its active layer
    empty."""
    img.create(dst, int(img.info(src)["virtual-size"]))
    img.snapshot_create(dst, BLANK)
    for tag in img.snapshots(src):  # oldest first; each written whole, so order is free
        if tag in owned:
            img.write_snapshot(src, tag, dst)
            img.snapshot_create(dst, tag)
    img.snapshot_apply(dst, BLANK)
    img.snapshot_delete(dst, BLANK)


class _Paced:
    """The archive's stream, with a failpoint once its first member has gone out (a test
    stops bmigrate there, mid-way through the checkpoints)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out, self._sent = out, 0

    def write(self, data: Any) -> int:
        n = self._out.write(data)
        self._sent += len(data)
        if self._sent > 1 << 20:
            self._out.flush()
            failpoint("bmigrate:shipping")
        return n

    def flush(self) -> None:
        self._out.flush()


# --- the node -----------------------------------------------------------------------------

def receive(ctx: Context, spec: VMSpec, sizes: dict[str, int], inp: IO[bytes]) -> None:
    """The archive send() wrote, from *inp*, checked, into the VM's folders (created, under
    the unfinished mark): its disks and its checkpoints. Anything wrong: ArchiveError."""
    wd, jname = ctx.workdir, spec.jname
    folder = wd.system(jname) / INCOMING
    folder.mkdir(mode=0o700)
    reader = Reader(inp)
    head = reader.header()
    try:
        members = {str(n): int(s) for n, s in head["members"]}
    except (KeyError, TypeError, ValueError):
        raise ArchiveError(f"{jname}: the checkpoints bmigrate sent lack their list") from None
    transfer.check_members(members)
    if any(not n.startswith(("vm/", "checkpoints/")) for n in members):
        raise ArchiveError(f"{jname}: the checkpoints bmigrate sent hold what they may not")
    transfer.extract(reader, folder, members, "bmigrate:received")
    reader.end()
    images = transfer.check_states(ctx, folder, spec, reader.sums, {})
    for name, info in images.items():
        if info.virtual_size != sizes[name]:
            raise ArchiveError(f"{jname}: the image bmigrate sent for {name} is not the "
                               "disk's size")
    for f in sorted((folder / "vm").iterdir()):
        os.rename(f, wd.disk(jname, f.name))
    fsync_dir(wd.vm_dir(jname))
    ckdirs = folder / "checkpoints"
    if ckdirs.is_dir():
        wd.checkpoints(jname).mkdir(mode=0o700, exist_ok=True)
        for ckdir in sorted(ckdirs.iterdir()):
            os.rename(ckdir, wd.checkpoint(jname, ckpstore.state_name(ckdir)))
        fsync_dir(wd.checkpoints(jname))
    remove_tree(folder)
