"""Scheduled checkpoints (core/manage/schedule.py): the pure decisions as tables (which VM is
due, which scheduled checkpoints expire), then run_due against the fake QEMU
(tests/unit/fakeqemu.py): a due VM gets one checkpoint, a busy one is skipped and retried,
an expired one is destroyed and a user's never is."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from cbsd import clock, specs
from cbsd.core.checkpoint import checkpoints
from cbsd.core.manage import cron, lifecycle, settings
from cbsd.core.manage.schedule import Due, State, due, expired, run_due
from cbsd.core.vm.context import Context
from cbsd.errors import CbsdError, UsageError
from cbsd.model import VMSpec
from cbsd.names import parse_duration
from cbsd.service.scheduler import Scheduler
from cbsd.storage import ckpstore

H = 3600.0
T0 = 1_796_536_800.0  # 2026-12-06 06:00 UTC: @hourly fires at T0 + n*H


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cron reads the host's local time: the tables are written in UTC."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()


# -- due: (schedule, last run, now) -> decision ---------------------------------------------

DUE = [
    ("", None, T0, Due.OFF),
    ("", T0, T0 + 5 * H, Due.OFF),
    ("@hourly", None, T0 + 10, Due.ARM),  # never ran: starts now, takes at the next slot
    ("@hourly", T0, T0 + 10, Due.WAIT),
    ("@hourly", T0, T0 + H - 1, Due.WAIT),
    ("@hourly", T0, T0 + H, Due.TAKE),
    ("@hourly", T0 + 10, T0 + H, Due.TAKE),  # last run mid-hour: the next whole hour
    ("@hourly", T0, T0 + 30 * H, Due.TAKE),  # 30 slots missed: one TAKE (the caller records)
    ("@hourly", T0 + 30 * H, T0 + 30 * H + 60, Due.WAIT),  # ...and after it, no catch-up
    ("@daily", T0, T0 + H, Due.WAIT),
    ("@daily", T0, T0 + 24 * H, Due.TAKE),
    ("*/15 * * * *", T0, T0 + 14 * 60, Due.WAIT),
    ("*/15 * * * *", T0, T0 + 15 * 60, Due.TAKE),
    ("0 3 * * *", T0, T0 + 21 * H - 1, Due.WAIT),  # T0 is 06:00 UTC
    ("0 3 * * *", T0, T0 + 21 * H, Due.TAKE),
]


@pytest.mark.parametrize(("expr", "last", "now", "want"), DUE)
def test_due(expr: str, last: float | None, now: float, want: Due) -> None:
    assert time.gmtime(T0).tm_hour == 6
    assert due(expr, last, now) is want


def test_a_missed_schedule_runs_once() -> None:
    """The host was down for a day: the first tick takes one, the next ones wait for the
    next slot (the tick records *now* as the last run)."""
    last, now, taken = T0, T0 + 24 * H + 120, 0
    for minute in range(0, 50):
        t = now + minute * 60
        if due("@hourly", last, t) is Due.TAKE:
            taken += 1
            last = t
    assert taken == 1


# -- expired: (states, pinned, now) -> names, in order ----------------------------------------

def S(name: str, parent: str | None, expires: float | None = None, *,
      scheduled: bool = True) -> State:
    return State(name, parent, scheduled, expires)


EXPIRED = [
    # nothing expired yet
    ([S("a1", None, T0 + 2 * H)], set(), T0 + H, []),
    # expired at exactly its time
    ([S("a1", None, T0 + 2 * H)], set(), T0 + 2 * H, ["a1"]),
    # no expiry: kept forever
    ([S("a1", None, None)], set(), T0 + 1000 * H, []),
    # a user's checkpoint never, whatever it is
    ([S("mine", None, T0, scheduled=False)], set(), T0 + 100 * H, []),
    # the one the running VM descends from stays
    ([S("a1", None, T0)], {"a1"}, T0 + H, []),
    # a chain of scheduled checkpoints (each the parent of the next): the expired end goes,
    # oldest first, the current one stays
    ([S("a1", None, T0), S("a2", "a1", T0 + H), S("a3", "a2", T0 + 2 * H),
      S("a4", "a3", T0 + 9 * H)], {"a4"}, T0 + 2 * H, ["a1", "a2", "a3"]),
    # a user's checkpoint descends from a2: a2 stays (the tree still needs it), a1 goes
    ([S("a1", None, T0), S("a2", "a1", T0), S("mine", "a2", None, scheduled=False)],
     set(), T0 + H, ["a1"]),
    # a branch point (a restore went back to a1, two lines from it): a1 stays until a line
    # is gone; here b2 is not expired, a2 is: a2 goes, then a1 has one child and goes too
    ([S("a1", None, T0), S("a2", "a1", T0), S("b2", "a1", T0 + 9 * H)], {"b2"}, T0 + H,
     ["a2", "a1"]),
    # ...and while both lines last, a1 stays
    ([S("a1", None, T0), S("a2", "a1", T0 + 9 * H), S("b2", "a1", T0 + 9 * H)], set(),
     T0 + H, []),
    # the hibernation image descends from a1 (pinned by the caller)
    ([S("a1", None, T0)], {"a1"}, T0 + H, []),
    # a damaged state (no manifest: listed as a user's) is never touched
    ([State("broken", None), S("a1", None, T0)], set(), T0 + H, ["a1"]),
]


@pytest.mark.parametrize(("states", "pinned", "now", "want"), EXPIRED)
def test_expired(states: list[State], pinned: set[str], now: float, want: list[str]) -> None:
    assert expired(states, pinned, now) == want


# -- the keys' checks (pure) --------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("12h", 43200), ("2d", 172800),
                                               ("1w", 604800), ("1d12h", 129600)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text, "checkpoint_expiry") == seconds


@pytest.mark.parametrize("text", ["", "2", "2 d", "2D", "-1h", "0m", "1.5h", "2days"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError, match="checkpoint_expiry"):
        parse_duration(text, "checkpoint_expiry")


@pytest.mark.parametrize("expr", ["@hourly", "@daily", "@weekly", "0 * * * *", "*/5 * * * *",
                                  "30 2 * * mon-fri", "0 0 1 jan *"])
def test_good_schedules(expr: str) -> None:
    specs.check_schedule_shape(expr, "checkpoint_schedule")
    cron.check_schedule(expr, T0)


@pytest.mark.parametrize("expr", ["@often", "* * * *", "* * * * * *", "99 * * * *",
                                  "0 0 31 2 *", "0 0 * * funday"])
def test_bad_schedules(expr: str) -> None:
    with pytest.raises(UsageError, match="checkpoint_schedule"):
        specs.check_schedule_shape(expr, "checkpoint_schedule")
        cron.check_schedule(expr, T0)


def test_pattern_names() -> None:
    assert specs.render_pattern("auto-%Y%m%d-%H%M", T0) == "auto-20261206-0600"
    with pytest.raises(UsageError, match="longer than 64"):
        specs.check_pattern("x" * 55 + "%Y%m%d%H%M", "checkpoint_pattern")


# -- run_due against the fake QEMU ------------------------------------------------------------

def scheduled(ctx: Context, jname: str = "vm1", **keys: object) -> None:
    settings.set_(ctx, jname, {"checkpoint_schedule": "@hourly", "checkpoint_expiry": "2h",
                               **keys})


@pytest.fixture
def at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The test's clock (CBSD_TEST_CLOCK): at[0] = seconds, then set_clock()."""
    f = tmp_path / "clock"
    monkeypatch.setenv(clock.ENV, str(f))
    now = [T0 + 10]
    f.write_text(str(now[0]))
    return now


def move(at: list[float], tmp_path: Path, seconds: float) -> float:
    at[0] += seconds
    (tmp_path / "clock").write_text(repr(at[0]))
    return at[0]


def names(ctx: Context, jname: str = "vm1") -> list[str]:
    return [ckpstore.state_name(p) for p, _ in ckpstore.list_states(ctx.workdir.checkpoints(jname))]


def lines(ctx: Context, now: float) -> list[str]:
    return [line for o in run_due(ctx, now)
            for line in [*o.lines, o.error[0] if o.error else ""] if line]


def test_a_due_vm_gets_one_checkpoint_and_expired_ones_go(
        ctx: Context, vm1: VMSpec, at: list[float], tmp_path: Path) -> None:
    scheduled(ctx)  # armed at T0+10
    lifecycle.start(ctx, "vm1")
    checkpoints.create(ctx, "vm1", "mine")  # a user's: never expires
    assert lines(ctx, at[0]) == []  # nothing due, nothing locked
    now = move(at, tmp_path, H)  # T0 + H + 10: the slot at T0 + H passed
    assert lines(ctx, now) == ["vm1: scheduled checkpoint auto-20261206-0700 taken (expires "
                               "2026-12-06T09:00Z)"]
    assert run_due(ctx, now) == []  # once per slot
    m = ckpstore.read_manifest(ctx.workdir.checkpoint("vm1", "auto-20261206-0700"))
    assert (m.scheduled, m.expires_ts) == (True, now + 2 * H)
    assert not ckpstore.read_manifest(ctx.workdir.checkpoint("vm1", "mine")).scheduled
    now = move(at, tmp_path, H)
    assert "auto-20261206-0800" in lines(ctx, now)[0]
    now = move(at, tmp_path, 5 * H)  # five slots missed: one checkpoint; 0200, 0300 expired
    assert lines(ctx, now) == [
        "vm1: scheduled checkpoint auto-20261206-1300 taken (expires 2026-12-06T15:00Z)",
        "vm1: expired checkpoint auto-20261206-0700 destroyed",
        "vm1: expired checkpoint auto-20261206-0800 destroyed"]
    assert names(ctx) == ["mine", "auto-20261206-1300"]
    listed = {c["name"]: c for c in checkpoints.listing(ctx, "vm1")}
    assert listed["auto-20261206-1300"]["expires"] == "2026-12-06T15:00Z"
    assert listed["mine"]["expires"] is None and not listed["mine"]["scheduled"]


def test_a_busy_vm_is_skipped_and_retried(
        ctx: Context, vm1: VMSpec, at: list[float], tmp_path: Path) -> None:
    scheduled(ctx)
    lifecycle.start(ctx, "vm1")
    now = move(at, tmp_path, H)
    with ctx.lock("vm1", "another command"):
        other = Context(ctx.workdir)
        done = threading.Event()
        result: list[list[str]] = []
        worker = threading.Thread(target=lambda: (result.append(lines(other, now)), done.set()))
        worker.start()
        assert done.wait(30), "the tick waited for the lock"
    assert result == [["vm1: busy (another cbsd command holds it): the schedule retries at "
                       "the next tick"]]
    assert lines(ctx, now + 60)[0].startswith("vm1: scheduled checkpoint auto-")


def test_a_stopped_vm_is_skipped_unless_asked(
        ctx: Context, vm1: VMSpec, at: list[float], tmp_path: Path) -> None:
    scheduled(ctx)
    now = move(at, tmp_path, H)
    assert lines(ctx, now) == ["vm1: Off (checkpoint_stopped=0): no scheduled checkpoint"]
    assert names(ctx) == []
    assert lines(ctx, now + 60) == []  # the slot was used: not retried every minute


def test_the_schedule_never_replaces_a_users_checkpoint(
        ctx: Context, vm1: VMSpec, at: list[float], tmp_path: Path) -> None:
    scheduled(ctx, checkpoint_pattern="latest")
    lifecycle.start(ctx, "vm1")
    checkpoints.create(ctx, "vm1", "latest")
    before = ckpstore.read_manifest(ctx.workdir.checkpoint("vm1", "latest")).created_ts
    now = move(at, tmp_path, H)
    out = run_due(ctx, now)
    assert out[0].error is not None and "exists and is not the schedule's" in out[0].error[0]
    assert ckpstore.read_manifest(ctx.workdir.checkpoint("vm1", "latest")).created_ts == before


def test_bset_of_the_schedule_keys_works_on_a_running_vm(ctx: Context, vm1: VMSpec) -> None:
    lifecycle.start(ctx, "vm1")
    settings.set_(ctx, "vm1", {"checkpoint_schedule": "@daily", "checkpoint_live": True})
    assert ctx.spec("vm1").checkpoint_schedule == "@daily"
    with pytest.raises(CbsdError, match="stop it first"):
        settings.set_(ctx, "vm1", {"checkpoint_expiry": "2h", "vm_cpus": 2})
    with pytest.raises(UsageError, match="checkpoint_schedule"):
        settings.set_(ctx, "vm1", {"checkpoint_schedule": "61 * * * *"})


def test_the_service_scheduler_ticks_until_stopped(
        ctx: Context, vm1: VMSpec, at: list[float], tmp_path: Path) -> None:
    scheduled(ctx)
    lifecycle.start(ctx, "vm1")
    move(at, tmp_path, H)
    seen: list[str] = []
    s = Scheduler(ctx.workdir, interval=0.05, report=lambda o: seen.extend(o.lines))
    s.start()
    deadline = time.monotonic() + 60
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    s.stop(timeout=60)
    assert seen and seen[0].startswith("vm1: scheduled checkpoint auto-20261206-0700")
    ticks = s.ticks
    time.sleep(0.2)
    assert s.ticks == ticks  # stopped: no more ticks
    assert dataclasses.replace(ctx.spec("vm1")).checkpoint_expiry == "2h"


def test_a_hibernated_vm_is_skipped_and_its_images_parent_kept(
        ctx: Context, vm1: VMSpec, at: list[float], tmp_path: Path) -> None:
    from cbsd.core.checkpoint import hibernate  # lazy: only this test hibernates

    scheduled(ctx)
    lifecycle.start(ctx, "vm1")
    now = move(at, tmp_path, H)
    assert lines(ctx, now)[0].startswith("vm1: scheduled checkpoint auto-20261206-0700 taken")
    hibernate.suspend(ctx, "vm1")  # the image descends from auto-20261206-0700
    now = move(at, tmp_path, 5 * H)  # past its expiry, and a slot due
    assert lines(ctx, now) == ["vm1: hibernated: no scheduled checkpoint"]
    assert names(ctx) == ["auto-20261206-0700"], "the hibernation image's parent stays"
