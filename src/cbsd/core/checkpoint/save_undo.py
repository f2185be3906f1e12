"""Putting a VM back as it was around a save (core/checkpoint/save.py): its run state once the
state is written (put_back), and after a failed save everything the save did undone
(rollback: the outgoing migration ended, the disk snapshots deleted, the temporary state
removed), each step attempted even when an earlier one fails."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from cbsd.core.vm.machine import VM, Image
from cbsd.core.vm.states import delete_tags
from cbsd.errors import CbsdError
from cbsd.qemu import migration
from cbsd.qemu.qmp import Monitor
from cbsd.qemu.runstate import ENDED, IN_PROGRESS, RunState
from cbsd.storage.atomic import remove_tree

# How long a mapped-ram save is waited out before it is cancelled after all: such a save of a
# stopped guest to a local file ends in seconds (1 GiB in ~0.3 s here); only a wedged disk
# takes longer, and then a QEMU that may crash is better than a command that never returns.
WAIT_OUT_S = 120.0


def put_back(mon: Monitor, was_running: bool) -> None:
    """Return the VM to the run state it had. After a completed migration QEMU 7.2 leaves it in
    'postmigrate' with its disks inactive; 'cont' reactivates them (probed, not assumed)."""
    # QEMU reports the migration completed (or failed) a moment before its migration thread
    # leaves 'finish-migrate' for 'postmigrate'; a 'cont' sent in between is undone by it.
    deadline = time.monotonic() + 10
    while (state := mon.status()) == RunState.FINISH_MIGRATE and time.monotonic() < deadline:
        time.sleep(0.001)
    if was_running:
        if state != RunState.RUNNING:
            mon.cmd("cont")
    elif state == RunState.POSTMIGRATE and not migration.activate_disks(mon):
        # QEMU 7.2 has no way to reactivate disks without running the vCPUs: the guest runs
        # for one QMP round trip (~0.5 ms). Sending 'stop' without awaiting 'cont' is no
        # way out: QEMU then asserts on a write to a still-inactive disk.
        mon.cmd("cont")
        mon.cmd("stop")


def rollback(vm: VM, mon: Monitor, tmp: Path, tags: list[tuple[Image, str]],
              was_running: bool, *, wait_out: bool = False) -> None:
    """Undo a failed save, leaving the VM as it was (even when a power-off was requested: that
    was conditional on success). Every step is attempted even if an earlier one fails."""
    if vm.alive():
        with contextlib.suppress(CbsdError, OSError):
            _end_migration(mon, wait_out=wait_out)
        with contextlib.suppress(CbsdError, OSError):
            put_back(mon, was_running)
    try:
        # Offline (qemu-img) when QEMU is gone: its lock on the image went with it.
        delete_tags(vm, tags)
    except (CbsdError, OSError):
        return  # keep tmp: it tells the next command to sweep the orphaned disk snapshots
    remove_tree(tmp)


def _end_migration(mon: Monitor, *, wait_out: bool = False) -> None:
    """Stop an outgoing migration still in progress. *wait_out*: let it finish (its file is
    discarded by the caller) instead of cancelling it. QEMU 10.0 can crash when a mapped-ram +
    multifd save is cancelled: a multifd sender thread still marks pages in the RAM block's
    file bitmap that the cancel's cleanup has already freed (segfault in `mig/src/send_N`;
    here about 1 in 10 cancelled hibernations with a cold page cache, docs/checkpoints.md)."""
    if mon.cmd("query-migrate").get("status") not in IN_PROGRESS:
        return
    if wait_out and _ended_within(mon, WAIT_OUT_S, 0.005):
        return
    mon.cmd("migrate_cancel")
    _ended_within(mon, 10, 0.01)


def _ended_within(mon: Monitor, seconds: float, poll: float) -> bool:
    """Whether the outgoing migration ends (completed, failed, cancelled) within *seconds*."""
    deadline = time.monotonic() + seconds
    while mon.cmd("query-migrate").get("status") not in ENDED:
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True
