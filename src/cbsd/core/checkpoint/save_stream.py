"""Following a saved state's memory file while QEMU writes it (core/checkpoint/save.py's
stream phase): its checksum and its writeback to disk as it grows, so that the save needs no
second pass."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cbsd.storage import ckpstore

WRITEBACK_CHUNK = 32 << 20  # a stream's bytes handed to writeback at once
WRITEBACK_EVERY = 0.05  # seconds between writebacks of a mapped-ram file's dirty pages


def _writeback_starter() -> Callable[[int, int, int], None]:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk without waiting.
    Python's os module lacks it; without it (not Linux), fall back to doing nothing. Offsets
    need no page alignment: the kernel rounds them to whole pages."""
    # lazy: ctypes is heavy: only a save starts writeback
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return lambda fd, off, n: None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return lambda fd, off, n: fn(fd, off, n, 2)  # 2 = SYNC_FILE_RANGE_WRITE


class Follower(threading.Thread):
    """Follows a file while QEMU writes its state into it and starts its writeback to disk
    as it goes, so the disk works while QEMU still writes and the final fsync has little left
    to do. A stream is appended in order: each new range is checksummed as it arrives. A
    mapped-ram file (*scattered*) is written at many offsets by several threads at once: its
    dirty pages are handed to writeback every WRITEBACK_EVERY seconds, and it is checksummed
    once QEMU is done (from the page cache). Without this a mapped-ram save of a 1 GiB guest
    flushed all of it after QEMU finished (docs/benchmarks/analysis.md, "Checkpoint engine v2")."""

    def __init__(self, path: Path, *, scattered: bool = False) -> None:
        super().__init__(daemon=True)
        # lazy: a C extension only a save hashes with; bcheckpoint list imports save.py
        import xxhash

        self._path, self._scattered = path, scattered
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._hash = xxhash.xxh3_128()
        self._writeback = _writeback_starter()
        self._flushed = 0
        self._writer_done = threading.Event()
        self._abort = threading.Event()
        self.size = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self._scattered:
                while not self._writer_done.wait(WRITEBACK_EVERY):
                    self._writeback(self._fd, 0, 0)  # 0 bytes: to the end of the file
                return
            while not self._abort.is_set():
                # Asked before the read: an end of file read before QEMU finished is not the
                # end (QEMU may write the rest and finish between that read and this check).
                done = self._writer_done.is_set()
                chunk = os.read(self._fd, ckpstore.CHUNK)
                if chunk:
                    self._hash.update(chunk)
                    self.size += len(chunk)
                    if self.size - self._flushed >= WRITEBACK_CHUNK:
                        self._writeback(self._fd, self._flushed, self.size - self._flushed)
                        self._flushed = self.size
                elif done:
                    return
                else:
                    time.sleep(0.002)
        except BaseException as e:  # reported by finish()
            self.error = e
        finally:
            os.close(self._fd)

    def finish(self) -> tuple[int, str]:
        self._writer_done.set()
        self.join()
        if self.error:
            raise self.error
        if self._scattered:
            return ckpstore.digest_file(self._path)
        return self.size, self._hash.hexdigest()

    def abandon(self) -> None:
        self._abort.set()
        self._writer_done.set()
        self.join()
