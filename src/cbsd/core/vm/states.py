"""Deleting saved states and the internal disk snapshots they own.

Below every command: a checkpoint destroy, a resume, a save replacing a state and recovery
all delete saved states the same way (hide, remove later, release snapshots under the lock),
and recovery finishes a deletion a command left half done (the `.releasing` mark).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from cbsd import debug
from cbsd.core.vm.machine import VM, Image
from cbsd.errors import CheckpointError, QemuError
from cbsd.failpoints import failpoint
from cbsd.qemu import img
from cbsd.storage import ckpstore
from cbsd.storage.atomic import remove_tree_later
from cbsd.storage.chunkstore import Store

TAG_PREFIX = "cbsd-"


def collect_chunks(vm: VM) -> None:
    """Free chunk-store data no saved state references, if a fold or a delete may have left
    some (the store's .dirty mark); never while a recipe is unreadable (what it references is
    unknown then: verify reports it)."""
    store = Store(vm.ctx.workdir.store(vm.jname))
    if not store.dirty():
        return
    known = ckpstore.recipes(vm.ctx.workdir.system(vm.jname))
    if known is not None:
        freed = store.collect(known)
        if debug.ON:
            debug.log("recover", f"{vm.jname}: chunk store: {freed} bytes freed")


def state_tags(vm: VM, manifest: ckpstore.Manifest) -> list[tuple[Image, str]]:
    """(image, snapshot tag) of each snapshot *manifest* names on one of the VM's images."""
    images = {image.name: image for image in vm.images()}
    return [(images[s.disk], s.tag) for s in manifest.disk_snapshots if s.disk in images]


def delete_tags(vm: VM, tags: list[tuple[Image, str]]) -> None:
    """Release internal snapshots: through QEMU while it runs (it holds the image's lock),
    with qemu-img otherwise."""
    online = vm.alive()
    for image, tag in tags:
        path = Path(image.path)
        if online:
            try:
                vm.monitor().cmd("blockdev-snapshot-delete-internal-sync", device=image.node,
                                 name=tag)
            except QemuError:
                if tag in img.snapshots(path):
                    raise
        elif path.exists() and tag in img.snapshots(path):
            img.snapshot_delete(path, tag)


def published_tags(vm: VM) -> set[str] | None:
    """The disk snapshots the VM's published states own; None while one of them is
    unreadable (what it owns is unknown: nothing may be taken for an orphan then)."""
    wd = vm.ctx.workdir
    tags: set[str] = set()
    states = ckpstore.list_states(wd.checkpoints(vm.jname))
    if ckpstore.has_manifest(wd.hibernation(vm.jname)):
        states.append((wd.hibernation(vm.jname), None))
    for path, m in states:
        try:
            m = m or ckpstore.read_manifest(path)
        except CheckpointError:
            return None  # a damaged state keeps its snapshots until it is destroyed
        tags |= {s.tag for s in m.disk_snapshots}
    return tags


def sweep_orphans(vm: VM) -> None:
    """Delete cbsd's snapshots that no published state owns any more; none while a state is
    damaged (destroying it sweeps again)."""
    keep = published_tags(vm)
    if keep is None:
        if debug.ON:
            debug.log("recover", f"{vm.jname}: a state is unreadable: no snapshot swept")
        return
    for image in vm.images():
        if Path(image.path).exists():
            orphans = [(image, t) for t in img.snapshots(Path(image.path))
                       if t.startswith(TAG_PREFIX) and t not in keep]
            delete_tags(vm, orphans)


def drop_state(vm: VM, path: Path) -> None:
    """Delete a saved state: first hide it (never listed again), then have its files removed
    after the command returns, then release its disk snapshots (under the VM's lock). The
    `.releasing` mark spans the steps: if the command dies after hiding the state (its files
    may be gone before the next command looks) or the release fails (a full disk can refuse
    qcow2 metadata writes), the next command's recovery sweeps the snapshots."""
    releasing = vm.ctx.workdir.releasing(vm.jname)
    with contextlib.suppress(OSError):  # a full disk must not stop a delete that frees it
        releasing.touch()
    try:
        m: ckpstore.Manifest | None = ckpstore.read_manifest(path)
    except CheckpointError:
        m = None
    folded = (path / ckpstore.RECIPE).exists()
    if folded:
        Store(vm.ctx.workdir.store(vm.jname)).mark_dirty()
    if not path.name.startswith("."):
        path = ckpstore.retire(path)
    remove_tree_later(path)
    failpoint("drop:hidden")
    if m is not None:
        delete_tags(vm, state_tags(vm, m))
    if folded:
        collect_chunks(vm)  # the hidden state's recipe no longer counts
    releasing.unlink(missing_ok=True)


def drop_state_and_sweep(vm: VM, path: Path) -> None:
    """Delete a published state and the disk snapshots it owns (VM running or not)."""
    drop_state(vm, path)
    sweep_orphans(vm)  # a damaged manifest cannot name its snapshots
