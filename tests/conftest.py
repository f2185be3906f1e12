"""Shared fixtures: an isolated workdir per test, the cbsd CLI as a user runs it, test guests.
The harness they use (and test modules import) is tests/harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guests import build
from tests.harness import COUNTER_RE, RAMFILE_MODE, Cbsd, kill_vms, xfs_mount


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """CBSD_TEST_RAMFILE=1 (scripts/test.sh's pass 3) changes one thing: where the `cbsd`
    fixture below puts a test's workdir. A test without that fixture (its workdirs are its
    own: a tmpfs, an XFS it mounts itself, a path that is no workdir) runs exactly as in
    pass 1, so there it would only run again: it is deselected (tests/unit/
    test_ramfile_mode.py checks that nothing else reads the variable)."""
    if not RAMFILE_MODE:
        return
    same = [i for i in items if "cbsd" not in getattr(i, "fixturenames", ())]
    if same:
        config.hook.pytest_deselected(items=same)
        items[:] = [i for i in items if "cbsd" in getattr(i, "fixturenames", ())]


@pytest.fixture(scope="session")
def reflink_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with xfs_mount(tmp_path_factory.mktemp("xfs") / "mnt") as mnt:
        yield mnt


@pytest.fixture
def cbsd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cbsd]:
    base = request.getfixturevalue("reflink_root") / tmp_path.name if RAMFILE_MODE else tmp_path
    wd = base / "wd"
    runner = Cbsd(wd)
    yield runner
    kill_vms(wd)


@pytest.fixture
def counter_image(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(fill_mib: int = 0, name: str = "counter.raw") -> Path:
        return build.counter_image(tmp_path / name, fill_mib)
    return make


@pytest.fixture
def counter_vm(request: pytest.FixtureRequest, cbsd: Cbsd, counter_image) -> str:  # type: ignore[no-untyped-def]
    """A defined (not started) boot-sector VM named 'vm1'. A test marked `stream` damages or
    inspects a checkpoint's plain `memory` file: its VM keeps it (no background fold)."""
    stream = ["vm_dedup=off"] if request.node.get_closest_marker("stream") else []
    cbsd("bcreate", "jname=vm1", f"image={counter_image()}", "vm_os_type=other",
         "vm_ram=32m", *stream).ok()
    return "vm1"


@pytest.fixture
def running_counter(cbsd: Cbsd, counter_vm: str) -> str:
    cbsd("bstart", counter_vm).ok()
    cbsd.console(counter_vm).wait(COUNTER_RE, count=3)
    return counter_vm


@pytest.fixture(scope="session")
def linux_guest() -> tuple[Path, Path]:
    return build.linux_guest()
