"""Cancellation by SIGINT/SIGTERM, visible to every thread.

Python delivers signals to the main thread only; commands that work on several VMs at once
(parallel=N) run them in worker threads. The CLI's signal handler calls request(); long waits
and the start of each VM's work call check(), which raises Cancelled in that thread so its own
rollback runs.
"""

from __future__ import annotations

import threading

from cbsd.errors import Cancelled

_requested = threading.Event()
_reason = ["cancelled"]


def request(reason: str) -> None:
    _reason[0] = reason
    _requested.set()


def check() -> None:
    if _requested.is_set():
        raise Cancelled(_reason[0])
