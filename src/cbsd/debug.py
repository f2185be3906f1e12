"""CBSD_DEBUG=1: QMP traffic, subprocesses and recovery decisions, logged to stderr.

Read once at import; when unset, every call site costs one attribute test (`if debug.ON:`), so
the quick lane and hot loops pay nothing. Secrets never reach the log (set_password's argument
is replaced)."""

from __future__ import annotations

import os
import sys
import time

ON = bool(os.environ.get("CBSD_DEBUG"))
_start = time.monotonic()


def log(topic: str, message: str) -> None:
    sys.stderr.write(f"cbsd[{time.monotonic() - _start:8.3f} {topic}] {message}\n")
    sys.stderr.flush()
