"""Scheduled checkpoints with expiry (issue 24, item 3), through the CLI against the counter
guest, with a clock the test moves (CBSD_TEST_CLOCK) instead of waiting hours: bset the keys,
`cbsd bschedule` takes the due checkpoint under the pattern's name, a schedule missed for
hours runs once, expired ones are destroyed after checkpoint_expiry, a user's own checkpoint
never is, mode=list shows each one's expiry, and a scheduled checkpoint restores with the
guest's counter going on from it. The service's loop (service/scheduler.py) runs the same
tick: driven here in-process against the same real VM."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Cbsd
from tests.vmchecks import counting, restored_from

pytestmark = pytest.mark.vm

CLOCK = "CBSD_TEST_CLOCK"  # cbsd/clock.py (spelled out: this module runs on a cbsd without it)
H = 3600.0
T0 = 1_796_536_800.0  # 2026-12-06 06:00 UTC


class Clock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.now = T0 + 10
        self.move(0)

    def move(self, seconds: float) -> float:
        """Atomically (a running service reads it at any moment)."""
        self.now += seconds
        tmp = self.path.with_name(".clock.tmp")
        tmp.write_text(repr(self.now))
        tmp.rename(self.path)
        return self.now


@pytest.fixture
def test_clock(cbsd: Cbsd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    """The CLI's clock (and this process's, for the in-process scheduler) is the file's;
    cron and the names are read in UTC."""
    c = Clock(tmp_path / "clock")
    for env in (cbsd.env, None):
        if env is None:
            monkeypatch.setenv(CLOCK, str(c.path))
            monkeypatch.setenv("TZ", "UTC")
            time.tzset()
        else:
            env.update({CLOCK: str(c.path), "TZ": "UTC"})
    yield c


def names(cbsd: Cbsd) -> list[str]:
    return [str(d["name"]) for d in cbsd.checkpoints("vm1")]


def tick(cbsd: Cbsd) -> list[str]:
    return cbsd("bschedule").ok().out.splitlines()


def test_hourly_checkpoints_appear_expire_and_restore(cbsd: Cbsd, counter_vm: str,
                                                      test_clock: Clock) -> None:
    cbsd("bset", "vm1", "checkpoint_schedule=@hourly", "checkpoint_expiry=2h").ok()
    cbsd("bstart", "vm1").ok()
    counting(cbsd, "vm1")
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=mine").ok()  # the user's own
    assert tick(cbsd) == []  # set at 06:00:10: the first slot is 07:00
    test_clock.move(H)
    before = counting(cbsd, "vm1", 1)
    assert tick(cbsd) == ["vm1: scheduled checkpoint auto-20261206-0700 taken "
                          "(expires 2026-12-06T09:00Z)"]
    taken = (before, counting(cbsd, "vm1", 1))
    assert tick(cbsd) == []  # one per slot
    listed = cbsd("bcheckpoint", "mode=list", "jname=vm1").ok().out
    assert "  └─ auto-20261206-0700 * (expires 2026-12-06T09:00Z)\n" in listed, listed
    assert "  mine\n" in listed  # no expiry: no note
    rows = {d["name"]: d for d in json.loads(cbsd("bcheckpoint", "mode=list", "jname=vm1",
                                                  "format=json").ok().out)}
    assert rows["auto-20261206-0700"]["expires"] == "2026-12-06T09:00Z"
    assert rows["auto-20261206-0700"]["scheduled"] is True
    assert rows["mine"]["expires"] is None and rows["mine"]["scheduled"] is False

    test_clock.move(H)
    assert tick(cbsd)[0].startswith("vm1: scheduled checkpoint auto-20261206-0800 taken")
    # The host is down for five hours: five slots missed, one checkpoint when it is back;
    # the two older scheduled ones are past their 2h and go, the user's stays.
    test_clock.move(5 * H)
    assert tick(cbsd) == [
        "vm1: scheduled checkpoint auto-20261206-1300 taken (expires 2026-12-06T15:00Z)",
        "vm1: expired checkpoint auto-20261206-0700 destroyed",
        "vm1: expired checkpoint auto-20261206-0800 destroyed"]
    assert tick(cbsd) == []
    assert names(cbsd) == ["mine", "auto-20261206-1300"]
    test_clock.move(100 * H)  # the user's never expires; 1300 is the one the VM descends
    out = tick(cbsd)  # from until the next one is taken
    assert out == ["vm1: scheduled checkpoint auto-20261210-1700 taken (expires "
                   "2026-12-10T19:00Z)", "vm1: expired checkpoint auto-20261206-1300 destroyed"]
    assert "mine" in names(cbsd)

    # A scheduled checkpoint is a checkpoint: restoring it continues the guest's counter.
    test_clock.move(H)
    before = counting(cbsd, "vm1", 1)
    assert "auto-20261210-1800 taken" in tick(cbsd)[0]
    taken = (before, counting(cbsd, "vm1", 1))
    cbsd("bstop", "vm1", "noacpi=1").ok()
    restored_from(cbsd, "vm1", "auto-20261210-1800", taken)


def test_a_busy_vm_is_skipped_and_taken_at_the_next_tick(cbsd: Cbsd, counter_vm: str,
                                                         test_clock: Clock) -> None:
    cbsd("bset", "vm1", "checkpoint_schedule=@hourly").ok()
    cbsd("bstart", "vm1").ok()
    counting(cbsd, "vm1")
    test_clock.move(H)
    held = cbsd.at_failpoint("save:verified", "bcheckpoint", "mode=create", "jname=vm1",
                             "name=slow")
    r = cbsd("bschedule", timeout=60).ok()  # never waits for the lock
    assert r.out == ("vm1: busy (another cbsd command holds it): the schedule retries at the "
                     "next tick\n")
    held.kill9()
    assert tick(cbsd) == ["vm1: scheduled checkpoint auto-20261206-0700 taken"]
    assert names(cbsd) == ["auto-20261206-0700"]  # the killed create left nothing


def test_the_keys_are_checked_as_every_key(cbsd: Cbsd, counter_vm: str) -> None:
    for key, value in (("checkpoint_schedule", "often"), ("checkpoint_schedule", "61 * * * *"),
                       ("checkpoint_expiry", "2days"), ("checkpoint_pattern", "../x-%H"),
                       ("checkpoint_pattern", "x-%Z"), ("checkpoint_live", "maybe")):
        cbsd("bset", "vm1", f"{key}={value}").fails(2, key)
    cbsd("bcreate", "jname=vm2", "checkpoint_expiry=1.5h").fails(2, "checkpoint_expiry")
    assert cbsd("bls", "format=json").ok().out.count('"jname"') == 1  # nothing made
    cbsd("bstart", "vm1").ok()
    cbsd("bset", "vm1", "checkpoint_schedule=0 */6 * * *", "checkpoint_live=1").ok()
    got = json.loads(cbsd("bget", "vm1", "format=json").ok().out)
    assert (got["checkpoint_schedule"], got["checkpoint_live"]) == ("0 */6 * * *", True)
    cbsd("bset", "vm1", "vm_cpus=2").fails(1, "stop it first")


def test_a_stopped_vm_gets_them_only_when_asked(cbsd: Cbsd, counter_vm: str,
                                                test_clock: Clock) -> None:
    cbsd("bset", "vm1", "checkpoint_schedule=@hourly").ok()
    test_clock.move(H)
    assert tick(cbsd) == ["vm1: Off (checkpoint_stopped=0): no scheduled checkpoint"]
    cbsd("bset", "vm1", "checkpoint_stopped=1", "checkpoint_pattern=off-%H").ok()
    test_clock.move(H)
    assert tick(cbsd) == ["vm1: scheduled checkpoint off-08 taken"]
    assert cbsd.status("vm1") == "Off"
    con = cbsd.console("vm1")
    mark = con.mark()
    cbsd("bstart", "vm1", "checkpoint=off-08").ok()  # its disks as they were: it boots
    counting(cbsd, "vm1")
    assert "BOOT" in con.since(mark)


def test_the_service_loop_runs_the_same_tick(cbsd: Cbsd, counter_vm: str,
                                             test_clock: Clock) -> None:
    # Imported here: the other tests of this module also run (and fail) on a cbsd without it.
    from cbsd.service.scheduler import Scheduler
    from cbsd.storage.paths import Workdir

    cbsd("bset", "vm1", "checkpoint_schedule=@hourly", "checkpoint_expiry=30m").ok()
    cbsd("bstart", "vm1").ok()
    counting(cbsd, "vm1")
    seen: list[str] = []
    s = Scheduler(Workdir(cbsd.workdir), interval=0.2, report=lambda o: seen.extend(o.lines))
    s.start()
    try:
        test_clock.move(H)
        wait_for(lambda: "auto-20261206-0700" in names(cbsd))
        test_clock.move(H)  # 0700 expired (30m), 0800 taken
        wait_for(lambda: names(cbsd) == ["auto-20261206-0800"])
    finally:
        s.stop(timeout=120)
    assert seen[:3] == ["vm1: scheduled checkpoint auto-20261206-0700 taken (expires "
                        "2026-12-06T07:30Z)",
                        "vm1: scheduled checkpoint auto-20261206-0800 taken (expires "
                        "2026-12-06T08:30Z)",
                        "vm1: expired checkpoint auto-20261206-0700 destroyed"]


def wait_for(cond: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_cbsd_serve_takes_and_expires_them(cbsd: Cbsd, counter_vm: str,
                                           test_clock: Clock) -> None:
    """The real service (its scheduler wired into create_app) follows the test's clock: the
    schedule set through the API is run, expired checkpoints go, a user's stays, and the API's
    checkpoint tree shows each one's expiry."""
    from tests.service import Service  # imported here: it needs the service's libraries

    cbsd("bstart", "vm1").ok()
    counting(cbsd, "vm1")
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=mine").ok()
    with Service(cbsd.workdir, env={CLOCK: str(test_clock.path), "TZ": "UTC"}) as svc:
        r = svc.client.patch("/1.0/instances/vm1/config", json={
            "checkpoint_schedule": "@hourly", "checkpoint_expiry": "2h"})
        assert r.status_code == 200, r.text
        assert r.json()["config"]["checkpoint_expiry"] == "2h"

        def listed() -> dict[str, Any]:
            return {c["name"]: c for c in
                    svc.client.get("/1.0/instances/vm1/checkpoints").json()["checkpoints"]}

        test_clock.move(H)
        wait_for(lambda: "auto-20261206-0700" in listed())
        assert listed()["auto-20261206-0700"]["expires"] == "2026-12-06T09:00Z"
        test_clock.move(3 * H)  # 0700 expired at 09:00; one checkpoint for three slots
        wait_for(lambda: set(listed()) == {"mine", "auto-20261206-1000"})
        # What it did is on the service's stderr (the journal under systemd), once the
        # tick reports (after its work).
        wait_for(lambda: "vm1: expired checkpoint auto-20261206-0700 destroyed"
                 in svc.log_text())
    assert "vm1: scheduled checkpoint auto-20261206-0700 taken" in svc.log_text()
    assert cbsd.status("vm1") == "On"
