"""Scheduled checkpoints: which VMs are due, which scheduled checkpoints have expired, and
run_due(), the one tick that `cbsd bschedule` and the service's scheduler both run.

The keys (VMSpec, bcreate/bset): checkpoint_schedule (cron, or @hourly...), checkpoint_expiry,
checkpoint_pattern, checkpoint_live, checkpoint_stopped. What the schedule made is recorded in
the checkpoint itself: its sealed manifest says `scheduled` and `expires_ts`, so the record
is replaced, moved, exported and destroyed with the checkpoint and a user's checkpoint is
never mistaken for the schedule's. When the schedule last ran is kept per VM in
jails-system/VM/schedule-last (written atomically), so a restart neither repeats nor loses
a slot: a schedule missed while nothing ran it runs once, at the first tick after.

The decisions (due, expired) are pure and tested as tables; run_due is their I/O, through
the core functions bcheckpoint uses, under the VM's lock taken without waiting (a busy VM
is skipped and retried at the next tick).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

from cbsd.core.checkpoint import checkpoints
from cbsd.core.checkpoint.tree import current
from cbsd.core.manage import lifecycle
from cbsd.core.manage.cron import last_run, next_slot, record_run
from cbsd.core.vm.context import Context
from cbsd.core.vm.machine import VM
from cbsd.errors import BusyError, CbsdError, describe
from cbsd.model import Status, VMSpec
from cbsd.names import parse_duration
from cbsd.specs import render_pattern
from cbsd.storage import ckpstore
from cbsd.storage.manifest import Manifest
from cbsd.storage.paths import Workdir

# -- pure decisions --------------------------------------------------------------------------

class Due(enum.Enum):
    OFF = "off"  # no schedule
    ARM = "arm"  # never ran: the schedule starts now (its first slot is the next one)
    WAIT = "wait"  # its next slot is still to come
    TAKE = "take"  # a slot passed since the last run: take one checkpoint now


def due(expr: str, last: float | None, now: float) -> Due:
    """Whether a VM with schedule *expr*, last run at *last*, takes a checkpoint at *now*.
    However many slots passed since *last* (the host was down), the answer is one TAKE: the
    caller records *now* as the last run, and the next slot comes after it."""
    if not expr:
        return Due.OFF
    if last is None:
        return Due.ARM
    return Due.TAKE if next_slot(expr, last) <= now else Due.WAIT


@dataclasses.dataclass(frozen=True)
class State:
    """What the expiry decision needs of one saved state of the VM."""

    name: str
    parent: str | None
    scheduled: bool = False
    expires_ts: float | None = None


def expired(states: Sequence[State], pinned: set[str], now: float) -> list[str]:
    """The scheduled checkpoints to destroy at *now*, in order: expired ones the tree does not
    need. Never a user's checkpoint; never one in *pinned* (the one the running VM descends
    from, the hibernation image's parent); never one a user's checkpoint descends from
    directly, nor a branch point (two or more children: a restore went back to it). Each
    destroy moves its children up to its parent (tree.reparent), and the rest is judged
    again on that tree, so a chain of scheduled checkpoints shortens from its expired end."""
    tree = {s.name: s for s in states}
    gone: list[str] = []
    while True:
        children: dict[str, list[State]] = {}
        for s in tree.values():
            if s.parent is not None:
                children.setdefault(s.parent, []).append(s)

        ripe = [s for s in tree.values() if s.scheduled and s.expires_ts is not None
                and s.expires_ts <= now and not _needed(s, children.get(s.name, []), pinned)]
        if not ripe:
            return gone
        victim = min(ripe, key=lambda s: (s.expires_ts or 0.0, s.name))
        del tree[victim.name]
        tree = {n: (dataclasses.replace(s, parent=victim.parent) if s.parent == victim.name
                    else s) for n, s in tree.items()}
        gone.append(victim.name)


def _needed(s: State, kids: list[State], pinned: set[str]) -> bool:
    return s.name in pinned or len(kids) > 1 or any(not k.scheduled for k in kids)


def expiry_seconds(spec: VMSpec) -> int | None:
    return parse_duration(spec.checkpoint_expiry, "checkpoint_expiry") \
        if spec.checkpoint_expiry else None


# -- I/O --------------------------------------------------------------------------------------

def _states(wd: Workdir, jname: str) -> tuple[list[State], set[str]]:
    """The VM's checkpoints as State, and the names the tree pins (see expired)."""
    states = [State(ckpstore.state_name(path), None) if m is None
              else State(m.name, m.parent, m.scheduled, m.expires_ts)
              for path, m in ckpstore.list_states(wd.checkpoints(jname))]
    pinned = {n for n in (current(wd, jname),) if n}
    with contextlib.suppress(CbsdError, OSError):
        if ckpstore.has_manifest(wd.hibernation(jname)):
            parent = ckpstore.read_manifest(wd.hibernation(jname)).parent
            if parent:
                pinned.add(parent)
    return states, pinned


@dataclasses.dataclass
class Outcome:
    """One VM's part of a tick: lines for stdout, and a failure (line, exit code) if any."""

    jname: str
    lines: list[str] = dataclasses.field(default_factory=list)
    error: tuple[str, int] | None = None


def run_due(ctx: Context, now: float, names: Sequence[str] | None = None) -> list[Outcome]:
    """One tick at *now*: every VM (or *names*) whose schedule is due takes one checkpoint,
    and expired scheduled checkpoints are destroyed. A VM with nothing to do is not locked."""
    out = []
    for jname in (names if names is not None else ctx.inventory.names()):
        o = Outcome(jname)
        try:
            spec = ctx.spec(jname)
            wd = ctx.workdir
            when = due(spec.checkpoint_schedule, last_run(wd, jname), now)
            if when is Due.ARM:
                record_run(wd, jname, now)
                o.lines.append(f"{jname}: checkpoint_schedule starts now (next: "
                               f"{checkpoints.iso_time(next_slot(spec.checkpoint_schedule, now))})")
            if when is Due.TAKE or expired(*_states(wd, jname), now):
                _run_locked(ctx, jname, when is Due.TAKE, now, o)
        except BusyError:
            o.lines.append(f"{jname}: busy (another cbsd command holds it): the schedule "
                           "retries at the next tick")
        except Exception as e:  # one VM's failure is its own line; the others go on
            o.error = describe(e)
        if o.lines or o.error:
            out.append(o)
    return out


def _run_locked(ctx: Context, jname: str, take: bool, now: float, o: Outcome) -> None:
    done = None
    with ctx.locked_vm(jname, "bschedule") as vm:  # no wait: BusyError if held
        wd = ctx.workdir
        if take and due(vm.spec.checkpoint_schedule, last_run(wd, jname), now) is Due.TAKE:
            try:
                done = _take(vm, now, o)
            finally:  # taken, skipped or failed: the slot is used (a failure waits for the next)
                record_run(wd, jname, now)
        for name in expired(*_states(wd, jname), now):
            checkpoints.drop(vm, name)
            o.lines.append(f"{jname}: expired checkpoint {name} destroyed")
    if done is not None:
        checkpoints.after_create(ctx, jname, done)


def _take(vm: VM, now: float, o: Outcome) -> tuple[str, bool] | None:
    spec, jname, wd = vm.spec, vm.jname, vm.ctx.workdir
    name = render_pattern(spec.checkpoint_pattern, now)
    existing = wd.checkpoint(jname, name)
    if ckpstore.has_manifest(existing) and not _scheduled(existing):
        raise CbsdError(f"{jname}: a checkpoint named {name} exists and is not the "
                        "schedule's: not replaced (change checkpoint_pattern=)")
    life = expiry_seconds(spec)

    def stamp(m: Manifest) -> None:
        m.scheduled = True
        m.expires_ts = None if life is None else m.created_ts + life

    status = vm.status(mine=True)
    if status in (Status.ON, Status.PAUSED):
        done = checkpoints.create_held(vm, name, live=spec.checkpoint_live, stamp=stamp)
    elif status is Status.OFF and spec.checkpoint_stopped:
        # Its disks as they are, in a checkpoint that boots from them when restored: QEMU
        # started paused (no guest instruction runs), saved, powered off, under one lock.
        lifecycle.start_held(vm, paused=True)
        try:
            done = checkpoints.create_held(vm, name, poweroff=True, stamp=stamp)
        except BaseException:
            with contextlib.suppress(Exception):
                vm.power_off()
            raise
    else:
        why = ("hibernated" if status is Status.SUSPENDED
               else "Off (checkpoint_stopped=0)")
        o.lines.append(f"{jname}: {why}: no scheduled checkpoint")
        return None
    expires = checkpoints.iso_time(None if life is None else now + life)
    o.lines.append(f"{jname}: scheduled checkpoint {name} taken"
                   + (f" (expires {expires})" if expires else ""))
    return done


def _scheduled(ckdir: Any) -> bool:
    try:
        return ckpstore.read_manifest(ckdir).scheduled
    except CbsdError:
        return False  # damaged: not known to be the schedule's, so never replaced
