"""The service's checkpoint schedules: a thread that runs the same tick as `cbsd bschedule`
(core/manage/schedule.run_due) once a minute.

The tick's work happens under each VM's lock, taken without waiting, so the scheduler and the
CLI (or the API) never act on one VM at once: a busy VM is skipped and retried at the next
tick. Stopping the service between ticks loses nothing: the last run is recorded per VM, and
a slot missed while the service was down runs once at the first tick after it starts (the
first tick runs at start()).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

from cbsd import clock
from cbsd.core.cluster import guard
from cbsd.core.manage.schedule import Outcome, run_due
from cbsd.core.vm.context import Context
from cbsd.errors import CbsdError, describe
from cbsd.storage.paths import Workdir

Report = Callable[[Outcome], None]


def _to_stderr(o: Outcome) -> None:
    for line in o.lines:
        print(f"cbsd serve: {line}", file=sys.stderr, flush=True)
    if o.error:
        print(f"cbsd serve: {o.error[0]}", file=sys.stderr, flush=True)


class Scheduler:
    """start() runs a tick at once and then every *interval* seconds, until stop()."""

    def __init__(self, workdir: Workdir, *, interval: float = 60.0,
                 report: Report = _to_stderr) -> None:
        self.workdir = workdir
        self.interval = interval
        self.report = report
        self.ticks = 0  # ticks completed (for the service's health and for tests)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticked_at: float | None = None  # the clock the last tick ran at

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="cbsd-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the loop to end and wait for it; a tick under way finishes its VM first (a
        checkpoint is not cut short by the service stopping)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def tick_now(self) -> None:
        """Run a tick without waiting for the interval (e.g. after the clock moved in a test,
        or an API call that changed a schedule)."""
        self._wake.set()

    def tick(self) -> list[Outcome]:
        """One tick, in the calling thread: its own Context (SQLite connections are per
        thread)."""
        self._ticked_at = now = clock.now()
        ctx = Context(self.workdir)
        guard.install_if_node(ctx)  # a scheduled change is guarded as the CLI's, when clustered
        outcomes = run_due(ctx, now)
        for o in outcomes:
            self.report(o)
        self.ticks += 1
        return outcomes

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # the loop outlives one bad tick (a full disk, a bad clock)
                line, _ = describe(e)
                self.report(Outcome("-", error=(f"schedule tick failed: {line}", 1)))
                self.ticks += 1
            self._pause()
            self._wake.clear()

    def _pause(self) -> None:
        """Until the next tick: *interval* seconds, or tick_now(), or stop(). Under a test's
        clock (CBSD_TEST_CLOCK), also as soon as the test moves it: a running service
        follows the test's time, as the CLI does at its next call."""
        if not os.environ.get(clock.ENV):
            self._wake.wait(self.interval)
            return
        deadline = time.monotonic() + self.interval
        while not self._wake.wait(0.1) and time.monotonic() < deadline:
            if _test_time() != self._ticked_at:  # moved since the last tick read it
                return


def _test_time() -> float | None:
    try:
        return clock.now()
    except CbsdError:
        return None  # being rewritten: read again at the next poll
