"""Cancellation: by SIGINT/SIGTERM for the whole process, or of one operation of the service.

Python delivers signals to the main thread only; commands that work on several VMs at once
(parallel=N) run them in worker threads. The CLI's signal handler calls request(); long waits
and the start of each VM's work call check(), which raises Cancelled in that thread so its own
rollback runs.

The service runs many operations at once in one process, so cancelling one must not cancel the
others: each operation's thread installs its own Token (scope()), and check() consults that
token as well as the process-wide request. A ContextVar, not threading.local: `contextvars`
is a builtin module (importing threading costs every command ~2 ms), and a thread starts with
an empty context, so a token never leaks into another operation's thread.
"""

from __future__ import annotations

from contextvars import ContextVar

from cbsd.errors import Cancelled

# A plain module-level value, not a threading.Event: one writer (the signal handler), readers
# that only poll, and every command imports this module -- importing threading costs ~2 ms.
_reason: list[str] = []


class Token:
    """One operation's cancel request: set once by cancel(), seen by check() in its thread."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason


_token: ContextVar[Token | None] = ContextVar("cbsd_cancel_token", default=None)


def request(reason: str) -> None:
    _reason[:] = [reason]


def scope(token: Token) -> None:
    """Make *token* the current thread's (context's) own cancel request."""
    _token.set(token)


def check() -> None:
    if _reason:
        raise Cancelled(_reason[0])
    token = _token.get()
    if token is not None and token.reason is not None:
        raise Cancelled(token.reason)
