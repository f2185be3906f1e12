"""The storage helpers every module shares (issue 22 item 6): free space, exclusive creation."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from cbsd.storage import paths


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
