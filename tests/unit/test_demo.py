"""scripts/demo.py: when the guest prints nothing in time, the demo shows the end of its console
log (what the guest did instead: a kernel panic, a missing disk) before it fails, and names a
guest that runs without its disk."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tests.paths import SCRIPTS

DEMO = SCRIPTS / "demo.py"


@pytest.fixture
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cbsd_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_silent_guest_shows_console_tail(demo: ModuleType, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "console.log"
    log.write_text("".join(f"boot line {i}\n" for i in range(100))
                   + "Kernel panic - not syncing: VFS: Unable to mount root fs\n")
    with pytest.raises(SystemExit, match="the guest printed nothing in time"):
        demo.wait_ticks(log, 0, 1, timeout=0.2)
    err = capsys.readouterr().err
    assert "Kernel panic - not syncing" in err
    assert "boot line 99" in err and "boot line 10\n" not in err  # the end, not all of it


def test_a_guest_without_its_disk_is_named(demo: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("cbsd-guest: up\ntick n=1 up=1.02\ntick n=2 up=1.54\n")  # no disk= field
    with pytest.raises(SystemExit, match="it runs but sees no disk"):
        demo.wait_ticks(log, 0, 1, timeout=0.2)
