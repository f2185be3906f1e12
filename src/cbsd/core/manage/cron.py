"""Cron expressions, read by croniter (docs/architecture.md says why that library): when a
checkpoint_schedule= fires next, whether bcreate/bset may accept one, and when it last ran.

croniter and dateutil cost ~80 ms to import, so they load only here and only when a schedule
is read: bls, bstart and a bset of other keys never pay for them.
"""

from __future__ import annotations

from typing import Any

from cbsd.errors import UsageError
from cbsd.storage.atomic import write_atomic
from cbsd.storage.paths import Workdir

LAST_RUN = "schedule-last"  # in jails-system/VM/: when the schedule last ran (seconds)


def _cron(expr: str, base: float) -> Any:
    # lazy: datetime, for croniter only (bstart imports this module)
    from datetime import datetime

    # lazy: croniter (and dateutil) cost ~80 ms: only bcreate/bset with a schedule and a tick
    from croniter import croniter

    # The host's local time, as cron reads its crontab (the offset in force at *base*).
    return croniter(expr, datetime.fromtimestamp(base).astimezone())


def next_slot(expr: str, after: float) -> float:
    """The first time *expr* fires strictly after *after* (seconds since the epoch)."""
    return float(_cron(expr, after).get_next(float))


def check_schedule(expr: str, now: float) -> None:
    """UsageError unless *expr* is a cron expression croniter reads and that fires at all
    (bcreate, bset; cbsd/specs.py has checked its shape)."""
    if not expr:
        return
    # lazy: see _cron
    from croniter import CroniterError

    try:
        next_slot(expr, now)
    except (CroniterError, ValueError, KeyError) as e:
        raise UsageError(f"bad value for checkpoint_schedule: '{expr}' ({e})") from None


def last_run(wd: Workdir, jname: str) -> float | None:
    """When the VM's schedule last ran (None: never, or since bset gave it a new one)."""
    try:
        return float((wd.system(jname) / LAST_RUN).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None  # never ran (or a damaged record: the schedule starts again)


def record_run(wd: Workdir, jname: str, when: float) -> None:
    """Durable before the tick goes on (write_atomic): a restart neither repeats the slot nor
    loses it."""
    write_atomic(wd.system(jname) / LAST_RUN, f"{when!r}\n".encode())
