"""The guest's clock after its vCPUs stood still: a pause, a checkpoint's own stop.

QEMU stops a guest's clocks with its vCPUs, and nothing in the guest notices (its chrony,
stopped too, still believes it is in sync): a guest paused for 10 s stays 10 s behind for
good unless cbsd sets its clock through the guest agent, as it does after a restore. On the
Debian guest (qemu-guest-agent, chrony without a reachable source) the tests wait for the
clock to come right within TOLERANCE; without the setting it stays ~10 s behind. A guest
without an agent (the boot-sector counter) gets a line on stderr saying its clock is behind.
The Debian guest's fixtures are in conftest.py (shared with test_debian.py: one boot).
"""

from __future__ import annotations

import re
import time

import pytest

from tests.guests.debian_ssh import Debian
from tests.harness import Cbsd
from tests.integration.test_pause import HEAVY, launched

pytestmark = pytest.mark.vm

STOOD = 10.0  # seconds the guest's vCPUs stand still in each test
# What cbsd guarantees once the agent has set the clock: the guest's clock agrees with the
# host's within this (the SSH round trip is already allowed for by clock_offset). Without
# the setting, the guest stays ~STOOD behind.
TOLERANCE = 1.5
CLOCK_WAIT = 150.0  # the helper waits up to 120 s for the agent; then ssh's own time


def stand_still(seconds: float) -> None:
    """Until *seconds* have passed on the host (the guest is stopped meanwhile)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        time.sleep(0.1)


def clock_comes_right(deb: Debian, after: str) -> float:
    """Poll the guest's clock against the host's until they agree within TOLERANCE (or fail
    at the deadline with the last offset seen). Returns the offset."""
    deadline = time.monotonic() + CLOCK_WAIT
    while True:
        offset = deb.clock_offset()
        if abs(offset) <= TOLERANCE:
            print(f"guest clock offset after {after}: {offset:+.2f} s")
            return offset
        assert time.monotonic() < deadline, \
            f"after {after} the guest's clock is still {offset:+.1f} s off the host's"
        time.sleep(1)


def clock_set_recorded(deb: Debian, since: float, what: str) -> None:
    """Until the agent helper's record says it set the guest's clock after host time *since*
    (it writes its record once the agent has also told it the guest's address: a moment
    after the clock was set)."""
    deadline = time.monotonic() + CLOCK_WAIT
    while True:
        when = deb.agent_state().get("clock_set")
        if isinstance(when, float) and when >= since:
            return
        assert time.monotonic() < deadline, f"no clock setting recorded after {what}"
        time.sleep(0.5)


def settled_start(deb: Debian) -> str:
    """Restore the `ready` checkpoint and wait until the restore's own helper has set the
    clock, so no later setting can be taken for the one under test."""
    boot = deb.start_from()
    clock_set_recorded(deb, 0.0, "the restore")
    clock_comes_right(deb, "the restore")
    return boot


@pytest.mark.debian
def test_clock_is_set_after_a_pause(deb: Debian) -> None:
    boot = settled_start(deb)
    # The quick lane (one exact name, mode=off), then the full path (a mask) with mode=auto.
    for resume in (("deb", "mode=off"), ("jname=de?", "mode=auto")):
        deb.cbsd("bpause", "deb", "mode=on").ok()
        stand_still(STOOD)
        since = time.time()
        r, mods = launched(deb.cbsd, "bpause", *resume)
        assert r.ok().out == "deb: resumed\n"
        if resume[0] == "deb":  # starting the helper loaded nothing the lane must not load
            assert "cbsd.core.vm.pause" in mods and not mods & HEAVY, sorted(mods & HEAVY)
        what = f"a {STOOD:.0f} s pause ({' '.join(resume)})"
        clock_comes_right(deb, what)
        clock_set_recorded(deb, since, what)  # the agent set it (not luck)
    deb.guest_is_sound(boot)


@pytest.mark.debian
def test_clock_is_set_after_a_checkpoint_held_stopped(deb: Debian) -> None:
    """A checkpoint whose stop lasts STOOD (held at the failpoint right after 'stop'), with
    live=0 and live=1: the guest's clock comes right in the guest itself."""
    boot = settled_start(deb)
    for extra in ((), ("live=1",)):
        stopped = deb.cbsd.at_failpoint("save:stopped", "bcheckpoint", "mode=create",
                                        "jname=deb", "name=held", *extra)
        stand_still(STOOD)
        stopped.resume().ok()
        clock_comes_right(deb, f"a checkpoint that stopped the guest for {STOOD:.0f} s "
                               f"({' '.join(extra) or 'live=0'})")
    deb.guest_is_sound(boot)


@pytest.mark.debian
def test_clock_is_set_after_a_plain_checkpoint(deb: Debian) -> None:
    """A plain checkpoint stops the guest for a fraction of a second (~0.4 s): too little to
    measure over SSH, so the helper's record must say it set the clock after it."""
    boot = settled_start(deb)
    since = time.time()
    deb.cbsd("bcheckpoint", "mode=create", "jname=deb", "name=quick").ok()
    clock_set_recorded(deb, since, "the checkpoint")
    clock_comes_right(deb, "a plain checkpoint")
    deb.guest_is_sound(boot)


NOTE = re.compile(r"^vm1: no guest agent answers: the guest's clock is (.*); install "
                  r"qemu-guest-agent in the guest, or set the clock there", re.M)


def test_without_an_agent_resume_says_the_clock_is_behind(cbsd: Cbsd,
                                                          running_counter: str) -> None:
    for resume in (("vm1", "mode=off"), ("jname=vm?", "mode=auto")):  # lane, full path
        assert cbsd("bpause", "vm1", "mode=on").ok().err == "", "a pause sets no clock"
        r = cbsd("bpause", *resume).ok()
        assert r.out == "vm1: resumed\n"
        note = NOTE.search(r.err)
        assert note and note[1] == "behind by as long as it was paused", r.err
    assert cbsd.status("vm1") == "On"


def test_without_an_agent_a_long_checkpoint_stop_says_the_clock_is_behind(
        cbsd: Cbsd, running_counter: str) -> None:
    stopped = cbsd.at_failpoint("save:stopped", "bcheckpoint", "mode=create", "jname=vm1",
                                "name=held")
    stand_still(2.0)
    note = NOTE.search(stopped.resume().ok().err)
    assert note, "the note on stderr"
    seconds = re.fullmatch(r"about (\d+) s behind", note[1])
    assert seconds and int(seconds[1]) >= 2, note[1]
