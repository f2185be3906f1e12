"""How a restore waits for QEMU's load (pure logic, with stand-ins for the VM and its monitor).
The integration test `test_a_load_longer_than_the_monitor_timeout` drives the real thing."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cbsd.core.checkpoint import load as savestate
from cbsd.errors import QemuError

SIZE = 1 << 20


class FakeVM:
    jname = "vm1"

    def __init__(self, alive: bool = True) -> None:
        self._alive = alive

    def alive(self) -> bool:
        return self._alive


class FakeMonitor:
    """QMP as QEMU gives it during a load: asked before the load ends, it says 'inmigrate'."""

    def __init__(self, fd: int, statuses: list[str] | None = None) -> None:
        self.fd = fd
        self.statuses = statuses
        self.asked_at: list[int] = []

    def status(self) -> str:
        pos = os.lseek(self.fd, 0, os.SEEK_CUR)
        self.asked_at.append(pos)
        if self.statuses is not None:
            return self.statuses.pop(0)
        return "paused" if pos >= SIZE else "inmigrate"

    def cmd(self, command: str, **args: Any) -> dict[str, Any]:
        assert command == "query-migrate"
        return {"status": "completed"}


@pytest.fixture
def fd(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "memory"
    path.write_bytes(b"\0" * SIZE)
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def test_qmp_is_asked_only_once_everything_was_read(fd: int) -> None:
    def qemu_reads() -> None:  # QEMU's copy of the fd shares the offset
        for pos in range(0, SIZE + 1, SIZE // 8):
            os.lseek(fd, pos, os.SEEK_SET)
            time.sleep(0.01)

    reader = threading.Thread(target=qemu_reads)
    reader.start()
    mon = FakeMonitor(fd)
    savestate._wait_incoming(FakeVM(), mon, lambda: os.lseek(fd, 0, os.SEEK_CUR), SIZE)  # type: ignore[arg-type]
    reader.join()
    assert mon.asked_at == [SIZE]


def test_an_offset_that_never_moves_falls_back_to_qmp(fd: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(savestate, "FOLLOW_START", 0.05)
    mon = FakeMonitor(fd, ["inmigrate", "inmigrate", "paused"])
    start = time.monotonic()
    savestate._wait_incoming(FakeVM(), mon, lambda: os.lseek(fd, 0, os.SEEK_CUR), SIZE)  # type: ignore[arg-type]
    assert time.monotonic() - start >= 0.05
    assert mon.asked_at == [0, 0, 0]


def test_qemu_exiting_during_the_load_is_reported(fd: int) -> None:
    with pytest.raises(QemuError, match=r"^vm1: QEMU exited while loading the state$"):
        savestate._wait_incoming(FakeVM(alive=False), FakeMonitor(fd),
                                 lambda: os.lseek(fd, 0, os.SEEK_CUR), SIZE)  # type: ignore[arg-type]
