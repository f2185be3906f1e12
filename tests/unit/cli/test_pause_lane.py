"""bpause's quick lane (cbsd/cli/quick.py, cbsd/core/pause.py) against the full command's own
rules: which spellings it takes, the names and workdir it accepts, the paths it opens. Its
behaviour on real VMs is in tests/integration/test_pause.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cbsd.cli import quick
from cbsd.core.vm import pause
from cbsd.core.vm.lock import VMLock
from cbsd.errors import UsageError
from cbsd.names import check_name
from cbsd.storage.paths import Workdir, default_workdir


def test_the_lane_opens_the_workdirs_own_paths(tmp_path: Path) -> None:
    wd, root = Workdir(tmp_path), str(tmp_path)
    system = pause.SYSTEM_DIR.format(root=root, jname="vm-1")
    assert pause.LOCK_FILE.format(root=root, jname="vm-1") == str(wd.lock_file("vm-1"))
    assert f"{system}/{pause.PIDFILE}" == str(wd.pidfile("vm-1"))
    assert f"{system}/{pause.QMP_SOCK}" == str(wd.qmp_sock("vm-1"))
    assert f"{system}/{pause.HIBERNATION}" == str(wd.hibernation("vm-1"))
    assert f"{system}/{pause.QGA_SOCK}" == str(wd.qga_sock("vm-1"))
    assert f"{system}/{pause.AGENT_STATE}" == str(wd.agent_state("vm-1"))


@given(st.text(alphabet=st.characters(max_codepoint=0x700), max_size=70)
       | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,70}", fullmatch=True))
def test_plain_names_are_exactly_the_valid_names(name: str) -> None:
    try:
        valid = check_name(name) == name
    except UsageError:
        valid = False
    assert quick._plain_name(name) is valid


@pytest.mark.parametrize("env", ["/srv/wd", "/srv/wd/", "/srv//wd", "rel/wd", "./wd", "/srv/./wd"])
def test_the_lane_finds_the_same_workdir(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    monkeypatch.setenv("CBSD_WORKDIR", env)
    assert quick._root() == str(default_workdir())


def test_a_workdir_with_dotdot_goes_the_full_way(monkeypatch: pytest.MonkeyPatch) -> None:
    # Path.absolute() keeps '..', abspath() folds it: they could name different directories.
    monkeypatch.setenv("CBSD_WORKDIR", "/srv/link/../wd")
    assert quick._root() is None


@pytest.mark.parametrize(("args", "taken"), [
    (["vm1"], ("vm1", "auto")),
    (["jname=vm1"], ("vm1", "auto")),
    (["jname=vm1", "mode=on"], ("vm1", "on")),
    (["mode=off", "vm1"], ("vm1", "off")),
    (["vm1", "mode=auto"], ("vm1", "auto")),
    ([], None),                              # the full parser says what is missing
    (["mode=on"], None),
    (["vm1", "vm2"], None),                  # several VMs
    (["jname=vm1", "jname=vm1"], None),
    (["vm*"], None),                         # masks need the inventory
    (["jname=vm?"], None),
    (["vm1", "mode=ON"], None),              # whatever the parser may accept, it decides
    (["vm1", "mode=on", "mode=off"], None),
    (["vm1", "parallel=2"], None),           # a key bpause does not have: the parser's error
    (["vm1", "--help"], None),
    (["-h"], None),
    (["-vm1"], None),
    (["jname="], None),
    (["../vm1"], None),                      # never a path
])
def test_which_spellings_take_the_lane(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       args: list[str], taken: tuple[str, str] | None) -> None:
    calls: list[tuple[str, str]] = []

    def fake_quick(root: str, jname: str, mode: str) -> None:
        calls.append((jname, mode))

    monkeypatch.setenv("CBSD_WORKDIR", str(tmp_path))
    monkeypatch.setattr(pause, "quick", fake_quick)
    assert quick.bpause(args) is None  # the fake declines, so every case ends on the full path
    assert calls == ([taken] if taken else [])


def test_a_lock_tells_whether_its_last_holder_died(tmp_path: Path) -> None:
    path = tmp_path / "vm1.lock"
    lock = VMLock(path, "vm1", "bpause").acquire()
    assert lock.died == ""
    assert path.read_text() == f"{os.getpid()} bpause\n"
    lock.release()
    assert path.read_text() == ""
    with VMLock(path, "vm1", "bpause").acquire() as again:
        assert again.died == "", "a released lock is clean"
    path.write_text("4242 bcheckpoint create\n")  # what a kill -9'd holder leaves
    with VMLock(path, "vm1", "bpause").acquire() as after_crash:
        assert after_crash.died == "4242 bcheckpoint create"


def test_the_lanes_run_state_literals_are_qemus() -> None:
    """The lane compares QEMU's run states as plain strings (importing enum costs it more
    than its work): they must be RunState's spelling."""
    from cbsd.core.vm import pause
    from cbsd.qemu.runstate import RunState

    source = Path(pause.__file__).read_text()
    lane = source[source.index("def quick("):]
    assert 'state == "paused"' in lane and '("running" if mode == "on" else "paused")' in lane
    assert {RunState.RUNNING.value, RunState.PAUSED.value} == {"running", "paused"}


def test_the_lanes_modules_import_nothing_heavy() -> None:
    """What bpause's quick lane imports, checked without a VM (the integration test checks
    the same on a real pause)."""
    import subprocess
    import sys

    heavy = {"re", "json", "enum", "typing", "pathlib", "dataclasses", "socket", "sqlite3",
             "threading", "subprocess", "cbsd.storage.inventory", "cbsd.core.manage.lifecycle"}
    p = subprocess.run([sys.executable, "-IS", "-X", "importtime", "-c",
                        "import sys; sys.path[:0] = " + repr(sys.path) + "; "
                        "import cbsd.cli.main, cbsd.cli.quick, cbsd.core.vm.pause, cbsd.qemu.qmp, "
                        "cbsd.qemu.agent"],  # a resume starts the clock helper from the lane
                       capture_output=True, text=True, check=True)
    mods = {ln.rsplit("|", 1)[1].strip() for ln in p.stderr.splitlines()
            if ln.startswith("import time:")}
    assert "cbsd.core.vm.pause" in mods
    assert not mods & heavy, sorted(mods & heavy)
