"""The wall clock every time-based decision reads (schedules, expiry, a state's creation
time), and the test hook that replaces it.

``now()`` is ``time.time()``, unless ``CBSD_TEST_CLOCK`` names a file: then it is the number
in that file, read at every call, so a test moves time by rewriting the file and a running
service follows at its next read. A test hook like CBSD_FAILPOINT (docs/reliability.md): an
unreadable or malformed clock file is an error, never a silent fall back to the real time.
"""

from __future__ import annotations

import os
import time

from cbsd.errors import CbsdError

ENV = "CBSD_TEST_CLOCK"


def now() -> float:
    """Seconds since the epoch: the real clock, or the test's (see the module's docstring)."""
    path = os.environ.get(ENV)
    if not path:
        return time.time()
    try:
        with open(path, encoding="ascii") as f:
            return float(f.read().strip())
    except (OSError, ValueError) as e:
        raise CbsdError(f"{ENV}={path}: not a readable clock file ({e})") from None
