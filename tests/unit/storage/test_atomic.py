"""The storage helpers every module shares (issue 22 item 6): free space, exclusive creation."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from cbsd.storage import atomic, paths


def test_free_bytes_counts_what_an_unprivileged_writer_may_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # f_bfree includes root's reserve; f_bavail does not: only f_bavail counts.
    fake = SimpleNamespace(f_bavail=3, f_bfree=1000, f_frsize=4096, f_bsize=65536)
    monkeypatch.setattr(os, "statvfs", lambda p: fake)
    assert paths.free_bytes(tmp_path) == 3 * 4096


def test_free_bytes_of_a_real_directory(tmp_path: Path) -> None:
    assert paths.free_bytes(tmp_path) >= 0


def test_free_bytes_of_a_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        paths.free_bytes(tmp_path / "missing")


def test_created_writes_an_owner_only_file_and_flushes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    dst = tmp_path / "f"
    with atomic.created(dst) as fd:
        os.write(fd, b"data")
        assert synced == []
    assert synced == [fd]
    assert dst.read_bytes() == b"data"
    assert dst.stat().st_mode & 0o777 == 0o600
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


@pytest.mark.parametrize("existing", ["file", "symlink", "dangling"])
def test_created_never_takes_over_what_is_there(tmp_path: Path, existing: str) -> None:
    dst, target = tmp_path / "f", tmp_path / "target"
    if existing == "file":
        dst.write_bytes(b"keep")
    else:
        if existing == "symlink":
            target.write_bytes(b"keep")
        dst.symlink_to(target)
    with pytest.raises(FileExistsError), atomic.created(dst):
        pytest.fail("the block must not run")
    assert dst.is_symlink() or dst.read_bytes() == b"keep"
    assert existing != "dangling" or not target.exists()
    assert existing != "symlink" or target.read_bytes() == b"keep"


class Boom(BaseException):
    pass


@pytest.mark.parametrize("error", [OSError(28, "full"), Boom()])
def test_a_failure_in_the_block_removes_the_file(tmp_path: Path, error: BaseException) -> None:
    dst = tmp_path / "f"
    opened: list[int] = []
    with pytest.raises(type(error)), atomic.created(dst) as fd:
        opened.append(fd)
        os.write(fd, b"half")
        raise error
    assert not dst.exists()
    with pytest.raises(OSError):
        os.fstat(opened[0])


def test_a_failed_flush_removes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", eio)
    dst = tmp_path / "f"
    with pytest.raises(OSError, match="I/O error"), atomic.created(dst) as fd:
        os.write(fd, b"data")
    assert not dst.exists()
