"""save_stream.Follower: the checksum and the write-behind of a state file while QEMU writes
it, for a stream (appended in order) and a mapped-ram file (written at many offsets by several
threads)."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import pytest

from cbsd.core.checkpoint import save_stream
from cbsd.storage import ckpstore

BLOCK = 64 << 10


@pytest.fixture
def writebacks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every (offset, length) the follower hands to writeback, in place of sync_file_range."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(save_stream, "_writeback_starter",
                        lambda: lambda fd, off, n: calls.append((off, n)))
    return calls


def test_a_stream_is_checksummed_as_it_is_appended(tmp_path: Path,
                                                   writebacks: list[tuple[int, int]]) -> None:
    path = tmp_path / "memory"
    path.touch()
    follower = save_stream.Follower(path)
    follower.start()
    with open(path, "ab") as f:
        for i in range(600):  # 37.5 MiB: more than one WRITEBACK_CHUNK
            f.write(bytes([i % 251]) * BLOCK)
            f.flush()
    assert follower.finish() == ckpstore.digest_file(path)
    # Handed to writeback in order, each piece once 32 MiB or more had come (reads return what
    # has been appended, so a piece may be a little longer).
    assert writebacks and writebacks[0][0] == 0
    assert all(n >= save_stream.WRITEBACK_CHUNK for _, n in writebacks)
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(writebacks))


def test_a_scattered_file_gets_writeback_while_written_and_its_checksum_after(
        tmp_path: Path, writebacks: list[tuple[int, int]]) -> None:
    path = tmp_path / "memory"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 64 * BLOCK)  # sparse, as mapped-ram lays out RAM
    follower = save_stream.Follower(path, scattered=True)
    follower.start()

    deadline = time.monotonic() + 10

    def writer(first: int) -> None:  # four threads, each its own offsets, holes left between
        # Until the follower has started writeback twice meanwhile (not a fixed time: a loaded
        # machine may wake it late), rewriting the same blocks.
        while len(writebacks) < 2 and time.monotonic() < deadline:
            for block in range(first, 64, 8):
                os.pwrite(fd, os.urandom(BLOCK), block * BLOCK)
                time.sleep(save_stream.WRITEBACK_EVERY / 4)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    during = len(writebacks)
    size, digest = follower.finish()
    os.close(fd)
    assert (size, digest) == ckpstore.digest_file(path)  # all of what was written, holes too
    assert during >= 2, "writeback was not started while the file was being written"
    assert set(writebacks) == {(0, 0)}  # the whole file each time: its dirty pages only


def test_an_abandoned_scattered_follower_stops_at_once(tmp_path: Path,
                                                       writebacks: list[tuple[int, int]]) -> None:
    path = tmp_path / "memory"
    path.touch()
    follower = save_stream.Follower(path, scattered=True)
    follower.start()
    t = time.monotonic()
    follower.abandon()
    assert not follower.is_alive()
    assert time.monotonic() - t < 1


def test_a_stream_finished_between_a_read_and_the_check_is_read_to_its_end(
        tmp_path: Path, writebacks: list[tuple[int, int]]) -> None:
    """QEMU may write the rest of the stream and finish right after the follower read the end
    of the file: what it wrote then is still checksummed (under load this once lost the
    stream's tail: 'verification failed: memory file has N bytes, checksummed M')."""
    path = tmp_path / "memory"
    path.write_bytes(b"head" * 1000)
    follower = save_stream.Follower(path)
    done = threading.Event()

    class WriterFinishesWhenAsked:
        """The writer's 'done' flag: the first time the follower asks after the end of the
        file, the rest is written and the writer finishes, all before the answer."""

        def is_set(self) -> bool:
            if not done.is_set() and os.path.getsize(path) == follower.size:
                with open(path, "ab") as f:
                    f.write(b"tail" * 1000)
                done.set()
            return done.is_set()

        def set(self) -> None:
            done.set()

        def wait(self, timeout: float | None = None) -> bool:
            return done.wait(timeout)

    follower._writer_done = WriterFinishesWhenAsked()  # type: ignore[assignment]
    follower.start()
    assert done.wait(60)
    assert follower.finish() == ckpstore.digest_file(path)
