"""Unit-test hygiene: a test that runs cbsd's main() in-process changes the umask, installs
SIGINT/SIGTERM handlers and may set the cancel flag; none of it may leak into later tests."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from cbsd import cancel


@pytest.fixture(autouse=True)
def restore_process_state() -> Iterator[None]:
    umask = os.umask(0o022)
    os.umask(umask)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    os.umask(umask)
    for s, h in handlers.items():
        signal.signal(s, h)
    cancel._reason.clear()
