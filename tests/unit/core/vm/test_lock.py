"""The status probe's view of the VM lock (core/vm/lock.py)."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from cbsd.core.vm import lock
from cbsd.core.vm.lock import YIELDS, is_held


def hold(path: Path, line: str, named: threading.Event | None,
         release: threading.Event) -> threading.Thread:
    """Take the lock as another holder does (its own open file), write *line* once *named*
    is set (at once if None), keep it until *release*."""
    took = threading.Event()

    def run() -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        took.set()
        if named is not None:
            named.wait(30)
        os.pwrite(fd, line.encode(), 0)
        release.wait()
        os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    took.wait()
    return t


def test_a_yielding_holder_that_names_itself_late_is_not_maintenance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder writes its line only after the probe has found the lock taken and the
    line still empty: the probe waits for it (within PROBE_GRACE, made long here so that a
    loaded host cannot turn the test into a race) and sees a yielding holder."""
    path = tmp_path / "vm1.lock"
    done, probed = threading.Event(), threading.Event()
    real = lock._read_holder
    reads: list[str] = []

    def read_holder(fd: int) -> str:
        text = real(fd)
        reads.append(text)
        probed.set()  # the holder names itself only now
        return text

    monkeypatch.setattr(lock, "_read_holder", read_holder)
    monkeypatch.setattr(lock, "PROBE_GRACE", 60.0)
    t = hold(path, f"123 fold {YIELDS}\n", probed, done)
    try:
        assert not is_held(path)
        assert reads[0] == "" and YIELDS in reads[-1]  # it was late, and was waited for
    finally:
        done.set()
        t.join()


def test_a_command_holding_the_lock_is_maintenance(tmp_path: Path) -> None:
    path = tmp_path / "vm1.lock"
    done = threading.Event()
    t = hold(path, "123 bstart\n", None, done)
    try:
        assert is_held(path)
    finally:
        done.set()
        t.join()
    assert not is_held(path)
