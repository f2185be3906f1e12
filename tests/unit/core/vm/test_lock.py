"""The status probe's view of the VM lock (core/vm/lock.py)."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from cbsd.core.vm.lock import YIELDS, is_held


def hold(path: Path, line: str, after: float, release: threading.Event) -> threading.Thread:
    """Take the lock as another holder does (its own open file), write *line* after
    *after* seconds, keep it until *release*."""
    took = threading.Event()

    def run() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        took.set()
        time.sleep(after)
        os.pwrite(fd, line.encode(), 0)
        release.wait()
        os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    took.wait()
    return t


def test_a_yielding_holder_that_names_itself_late_is_not_maintenance(tmp_path: Path) -> None:
    path = tmp_path / "vm1.lock"
    done = threading.Event()
    t = hold(path, f"123 fold {YIELDS}\n", 0.03, done)
    try:
        assert not is_held(path)
    finally:
        done.set()
        t.join()


def test_a_command_holding_the_lock_is_maintenance(tmp_path: Path) -> None:
    path = tmp_path / "vm1.lock"
    done = threading.Event()
    t = hold(path, "123 bstart\n", 0.0, done)
    try:
        assert is_held(path)
    finally:
        done.set()
        t.join()
    assert not is_held(path)
