"""Recovery: what the next locked command does after an interrupted (even kill -9'd) one.

Runs once per command, in Context.locked_vm, before the command's own work. Two halves:
  - plan(): a pure decision -- QEMU's run state, whether a hibernation image is published,
    and the run state an interrupted save recorded -> the steps to take (unit-tested as a
    table of every combination, tests/unit/test_recovery.py);
  - recover(): finds the facts (including a QEMU that a command killed during its launch left
    unrecorded), runs the steps, clears partial files and orphaned disk snapshots.

The invariant that makes plan() simple: a published hibernation image always holds the
guest's latest state. A suspend ends QEMU without running the guest again, and a resume
retires the image before the guest runs (core/load.py). So a live QEMU beside a published
image has not run since it was made -- except one that is running, which can only be left
by an older cbsd: its image is stale and dropped.
"""

from __future__ import annotations

import contextlib
import enum
import json
import time
from pathlib import Path

from cbsd import debug
from cbsd.core.vm import VM, Image
from cbsd.errors import CheckpointError, QemuError
from cbsd.failpoints import failpoint
from cbsd.qemu import img
from cbsd.qemu.runstate import RunState
from cbsd.storage import ckpstore
from cbsd.storage.atomic import remove_tree, remove_tree_later

TAG_PREFIX = "cbsd-"
INTENT = "intent"  # in a temporary save directory: the run state to return to


class Step(enum.Enum):
    KILL = "end QEMU (SIGKILL): it never got its state"
    POWER_OFF = "power QEMU off: the hibernation image holds the guest"
    DROP_IMAGE = "drop the hibernation image: the guest ran past it"
    CONT = "resume the vCPUs, as the interrupted save found them"
    CONT_THEN_STOP = "reactivate the disks and leave the VM paused, as the save found it"


def plan(qemu: RunState | None, image: bool, intent: str) -> tuple[Step, ...]:
    """The steps that bring a VM back to a sound state.

    qemu: QEMU's run state, None when no QEMU runs; image: a hibernation image is published;
    intent: 'running' or 'paused' as recorded by a save that did not finish, '' if none."""
    if qemu is None:
        return ()
    if qemu is RunState.INMIGRATE:
        return (Step.KILL,)  # a restore or resume that never finished loading
    if image:
        return (Step.DROP_IMAGE,) if qemu is RunState.RUNNING else (Step.POWER_OFF,)
    if qemu is RunState.POSTMIGRATE:
        # A save's migration completed but the VM was not put back; its disks are inactive.
        return (Step.CONT,) if intent == "running" else (Step.CONT_THEN_STOP,)
    if qemu is RunState.PAUSED and intent == "running":
        return (Step.CONT,)  # stopped by a save that was killed before it resumed the guest
    return ()


def recover(vm: VM, died: str = "") -> None:
    """Bring *vm* back to a sound state; needs the VM's lock. *died*: what the lock file
    said of a previous holder that never released it (VMLock.died)."""
    wd = vm.ctx.workdir
    if wd.moving(vm.jname).exists():  # a bmove or bmigrate cut short
        from cbsd.core import move

        move.settle(vm)
    _settle_definition(vm)
    adopt_lost_qemu(vm, scan=bool(died))
    doomed: list[Path] = []
    for d in (wd.checkpoints(vm.jname), wd.system(vm.jname)):
        if d.is_dir():
            doomed += ckpstore.settle(d)
    intents = [_read_intent(p) for p in doomed]
    intent = "running" if "running" in intents else "paused" if "paused" in intents else ""
    image = wd.hibernation(vm.jname)
    state = _settled_state(vm)
    steps = plan(state, ckpstore.has_manifest(image), intent)
    if debug.ON and (died or doomed or steps):
        debug.log("recover", f"{vm.jname}: died={died!r} doomed={[p.name for p in doomed]} "
                  f"qemu={state} image={ckpstore.has_manifest(image)} intent={intent!r} -> "
                  f"{[s.name for s in steps]}")
    for step in steps:
        if step is Step.KILL:
            vm.kill()
        elif step is Step.POWER_OFF:
            vm.power_off()
        elif step is Step.DROP_IMAGE:
            drop_state(vm, image)
        else:
            vm.monitor().cmd("cont")
            if step is Step.CONT_THEN_STOP:
                vm.monitor().cmd("stop")
    for path in doomed:
        remove_tree(path)
    releasing = wd.releasing(vm.jname)
    if doomed or releasing.exists():
        sweep_orphans(vm)
        releasing.unlink(missing_ok=True)
    collect_chunks(vm)


def collect_chunks(vm: VM) -> None:
    """Free chunk-store data no saved state references, if a fold or a delete may have left
    some (the store's .dirty mark); never while a recipe is unreadable (what it references is
    unknown then: verify reports it)."""
    from cbsd.storage.chunkstore import Store

    store = Store(vm.ctx.workdir.store(vm.jname))
    if not store.dirty():
        return
    known = ckpstore.recipes(vm.ctx.workdir.system(vm.jname))
    if known is not None:
        freed = store.collect(known)
        if debug.ON:
            debug.log("recover", f"{vm.jname}: chunk store: {freed} bytes freed")


def _settle_definition(vm: VM) -> None:
    """Finish what a cut-short brename or bset left: folders still under the old name (the
    inventory entry already moved: brename's note names this VM), a stale note (the entry
    never moved), or a vm.json older than the inventory."""
    wd = vm.ctx.workdir
    from cbsd.core.manage import RENAME_NOTE, finish_rename

    note = wd.system(vm.jname) / RENAME_NOTE
    if note.exists():
        note.unlink()  # the entry still has this name: the rename never happened
    if not wd.system(vm.jname).exists():
        for other in (wd.root / "jails-system").glob(f"*/{RENAME_NOTE}"):
            if other.read_text().strip() == vm.jname:
                if debug.ON:
                    debug.log("recover", f"{vm.jname}: finishing brename from "
                              f"{other.parent.name}")
                finish_rename(vm.ctx, other.parent.name, vm.jname)
                break
    from cbsd.core.disks import clear_unfinished_attach

    clear_unfinished_attach(vm.ctx, vm.spec)
    spec_file = wd.spec_file(vm.jname)
    try:
        on_disk = json.loads(spec_file.read_bytes())
    except (OSError, ValueError):
        on_disk = None
    if on_disk != vm.spec.to_dict() and wd.system(vm.jname).exists():
        from cbsd.core.lifecycle import save_spec_file

        save_spec_file(vm.ctx, vm.spec)


def _settled_state(vm: VM) -> RunState | None:
    """QEMU's run state, waiting out the instant between a migration's end and 'postmigrate'
    (a state read then would be gone a moment later)."""
    if not vm.alive():
        return None
    try:
        deadline = time.monotonic() + 10
        while (state := RunState.parse(vm.monitor().status())) is RunState.FINISH_MIGRATE \
                and time.monotonic() < deadline:
            time.sleep(0.001)
    except QemuError as e:
        if not vm.alive():
            return None
        raise QemuError(f"{vm.jname}: QEMU (pid {vm.pid}) does not answer its monitor ({e}); "
                        f"'cbsd bstop jname={vm.jname} noacpi=1' powers it off") from e
    return state


def adopt_lost_qemu(vm: VM, *, scan: bool) -> None:
    """A QEMU this VM's command line names but the inventory does not: a command killed after
    QEMU started and before it recorded the pid. Found through QEMU's pid file (VM.alive
    already looks there), or, after a command died, through every process's argv."""
    if not vm.alive() and scan:
        from cbsd.qemu.process import find_by_marker

        pid = find_by_marker(vm.paths.qmp_sock)
        if pid:
            vm.pid = pid
    if vm.pid and vm.pid != vm.recorded_pid and vm.alive():
        if debug.ON:
            debug.log("recover", f"{vm.jname}: adopting QEMU pid {vm.pid} "
                      f"(recorded {vm.recorded_pid})")
        vm.adopt()


def _read_intent(path: Path) -> str:
    try:
        return (path / INTENT).read_text().strip()
    except OSError:
        return ""


# --- deleting saved states and their disk snapshots ------------------------------------------

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
        from cbsd.storage.chunkstore import Store

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
