"""Cancellation by SIGINT/SIGTERM, visible to every thread.

Python delivers signals to the main thread only; commands that work on several VMs at once
(parallel=N) run them in worker threads. The CLI's signal handler calls request(); long waits
and the start of each VM's work call check(), which raises Cancelled in that thread so its own
rollback runs.
"""

from __future__ import annotations

from cbsd.errors import Cancelled

# A plain module-level value, not a threading.Event: one writer (the signal handler), readers
# that only poll, and every command imports this module -- importing threading costs ~2 ms.
_reason: list[str] = []


def request(reason: str) -> None:
    _reason[:] = [reason]


def check() -> None:
    if _reason:
        raise Cancelled(_reason[0])
