"""Pause and resume: the step both bpause paths share, and the quick lane.

`bpause` is what scripts call around a host-side backup or a debugger session, often in loops,
and its work is two QMP requests (~2 ms). Through the full command it takes ~60 ms, nearly all
of it importing what other commands need (the inventory's sqlite3, the state store, the
argument tables). So the common case -- one VM named exactly, its QEMU alive and running or
paused, its last command finished -- takes a lane that needs nothing but os, fcntl and a
socket: quick(). Anything else returns None from it and the full command (lifecycle.pause)
runs, with every check and message. Both end in switch(), so both report the same.

Why the lane may skip the inventory and the recovery the full command runs first:
  - a live QEMU whose command line names this VM's QMP socket exists only for a VM cbsd made
    (bremove powers it off under the VM's lock before it drops the row; a VM whose inventory
    entry was lost is still this VM, and `bregister` brings the entry back);
  - recovery has work only after a command died mid-way (kill -9, power loss), and such a
    command leaves its line in the lock file (VMLock.died); a live QEMU in a migration state
    (anything but running/paused) or a hibernation image beside a live QEMU also go the full way.
This module imports only what the lane needs; a test pins that list (test_pause.py).

A resumed guest's clock is behind by the time it was paused: QEMU stops the guest's clocks
with its vCPUs, and nothing in the guest notices (chrony, paused too, still believes it is in
sync). So a resume sets it through the guest agent, as a restore does (set_clock); a
checkpoint's own stop and 'cont' end the same way (core/checkpoint/save.py).
"""

from __future__ import annotations

import os
import sys

from cbsd.core.vm.lock import VMLock
from cbsd.errors import QemuError
from cbsd.qemu import process
from cbsd.qemu.qmp import Monitor

# The workdir layout of storage/paths.py (Workdir), spelled as strings: pathlib alone would cost
# more than the lane's work. tests/unit/cli/test_pause_lane.py holds them equal.
LOCK_FILE = "{root}/var/lock/{jname}.lock"
SYSTEM_DIR = "{root}/jails-system/{jname}"
PIDFILE, QMP_SOCK, HIBERNATION = "qemu.pid", "qmp.sock", "hibernate.ckp"
QGA_SOCK, AGENT_STATE = "qga.sock", "agent.json"


def switch(mon: Monitor, jname: str, mode: str, system: str) -> str:
    """'on' pauses, 'off' resumes; QEMU's own run state must confirm it. Returns the message.
    *system* is the VM's jails-system folder (SYSTEM_DIR)."""
    run = mode == "off"
    mon.cmd("cont" if run else "stop")
    if mon.running() != run:
        raise QemuError(f"{jname}: QEMU did not {'resume' if run else 'pause'}")
    if run:
        note = set_clock(mon, jname, system)
        if note:
            print(note, file=sys.stderr, flush=True)
    return f"{jname}: {'resumed' if run else 'paused'}"


def set_clock(mon: Monitor, jname: str, system: str, stood: float | None = None) -> str | None:
    """The guest runs again after its vCPUs stood still: for *stood* seconds (a checkpoint's
    stop), or for as long as it was paused (None). With an agent listening (asked of QEMU, not
    of the guest), the detached helper sets the guest's clock from the host's once the agent
    answers; the command does not wait for it. Without one, the note that says so, for the
    caller to print once its command succeeded (a failure's stderr is its one error line):
    after a checkpoint's stop only when it left the clock a second or more behind."""
    # lazy: only a resume sets the clock; a pause on the quick lane skips the agent module
    from cbsd.qemu import agent

    try:
        if agent.listening(mon):
            agent.start_helper(f"{system}/{QGA_SOCK}", f"{system}/{AGENT_STATE}",
                               agent.SETTIME_WAIT, settime=True)
            return None
        why = "no guest agent answers"
    except (QemuError, OSError) as e:  # the guest runs again all the same: not a failure
        why = f"its clock could not be set ({e})"
    if stood is not None and stood < 1:
        return None
    behind = "behind by as long as it was paused" if stood is None else \
        f"about {stood:.0f} s behind"
    return f"{jname}: {why}: the guest's clock is {behind}; {agent.SET_IT_YOURSELF}"


def quick(root: str, jname: str, mode: str) -> str | None:
    """Pause/resume (*mode* on, off, auto) a VM in the common case; None: take the full path.
    *jname* must already be a valid plain name (it becomes part of paths)."""
    system = SYSTEM_DIR.format(root=root, jname=jname)
    qmp_sock = f"{system}/{QMP_SOCK}"
    try:
        with open(f"{system}/{PIDFILE}", "rb") as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return None
    # Checked before locking too, so a name that is no VM never gets a lock file.
    if not process.alive(pid, qmp_sock):
        return None
    lock = VMLock(LOCK_FILE.format(root=root, jname=jname), jname, "bpause").acquire()
    try:
        if lock.died or os.path.exists(f"{system}/{HIBERNATION}") or \
                not process.alive(pid, qmp_sock):
            return None
        try:
            mon = Monitor(qmp_sock, jname)
        except QemuError:
            return None  # the full command says why, in its own words
        with mon:
            try:
                state = mon.status()
            except QemuError:
                return None
            if mode == "auto":
                mode = "off" if state == "paused" else "on"
            if state != ("running" if mode == "on" else "paused"):
                return None  # already there, or mid-migration: the full command explains
            return switch(mon, jname, mode, system)
    finally:
        lock.release()
