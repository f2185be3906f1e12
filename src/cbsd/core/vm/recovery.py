"""Recovery: what the next locked command does after an interrupted (even kill -9'd) one.

Runs once per command, in Context.locked_vm, before the command's own work. Two halves:
  - plan(): a pure decision -- QEMU's run state, whether a hibernation image is published,
    and the run state an interrupted save recorded -> the steps to take (unit-tested as a
    table of every combination, tests/unit/core/vm/test_recovery.py);
  - recover(): finds the facts (including a QEMU that a command killed during its launch left
    unrecorded), runs the steps, clears partial files and orphaned disk snapshots.

The invariant that makes plan() simple: a published hibernation image always holds the
guest's latest state. A suspend ends QEMU without running the guest again, and a resume
retires the image before the guest runs (core/checkpoint/load.py). So a live QEMU beside a published
image has not run since it was made -- except one that is running, which can only be left
by an older cbsd: its image is stale and dropped.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path

from cbsd import debug
from cbsd.core.vm import definition, fsfreeze, moving, snapshots
from cbsd.core.vm.machine import VM, adopt_lost_qemu
from cbsd.core.vm.states import collect_chunks, drop_state, sweep_orphans
from cbsd.errors import QemuError
from cbsd.qemu.runstate import RunState
from cbsd.storage import ckpstore
from cbsd.storage.atomic import remove_tree

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
        moving.settle(vm)
    definition.settle(vm)
    adopt_lost_qemu(vm, scan=bool(died))
    fsfreeze.recover(vm)  # a guest a dead bsnapshot left frozen (if its guard died too)
    snapshots.settle(vm)  # a bsnapshot create, destroy or rollback cut short
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


def _read_intent(path: Path) -> str:
    try:
        return (path / INTENT).read_text().strip()
    except OSError:
        return ""
