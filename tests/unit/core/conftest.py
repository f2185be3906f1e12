"""The fake-QEMU tier's fixtures: a workdir, a fake QEMU as CBSD_QEMU (tests/unit/fakeqemu.py)
and a VM defined through bcreate's own code (real qcow2 disks, made by qemu-img)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbsd.core.manage import lifecycle
from cbsd.core.vm.context import Context
from cbsd.model import VMSpec
from cbsd.qemu import host
from cbsd.storage.paths import Workdir
from tests.unit.fakeqemu import FakeQemu


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short path: a unix socket's path has at most 107 bytes, pytest's tmp_path can be
    longer than that with a VM's folders under it."""
    path = Path(tempfile.mkdtemp(prefix="fq", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeQemu]:
    fq = FakeQemu(short_tmp / "qemu")
    monkeypatch.setenv("CBSD_QEMU", str(fq.binary))
    monkeypatch.setenv("CBSD_ACCEL", "tcg")
    monkeypatch.delenv("CBSD_FAILPOINT", raising=False)
    host.probe.cache_clear()  # probed once per binary and process
    yield fq
    fq.end_all()
    host.probe.cache_clear()


@pytest.fixture
def ctx(short_tmp: Path, fake: FakeQemu) -> Context:
    return Context(Workdir(short_tmp / "wd"))


def define(ctx: Context, jname: str = "vm1") -> VMSpec:
    """A VM as bcreate makes it: a 1 MiB qcow2 disk, guest RAM not in a file."""
    spec = VMSpec(jname=jname, ram=64 << 20, ram_file="off", dedup="off")
    return lifecycle.create(ctx, spec, imgsize=1 << 20)


@pytest.fixture
def vm1(ctx: Context) -> VMSpec:
    return define(ctx)
