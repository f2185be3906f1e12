"""bpause: frozen guests print nothing, resumed ones continue the same count."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import COUNTER_RE, Cbsd, Result, counter_lines

pytestmark = pytest.mark.vm

# The `cbsd` command as scripts/setup.sh installs it, and what the quick lane must never load:
# each of these costs more than a pause's whole work (cbsd/core/pause.py).
LAUNCHER = Path(sys.executable).parent / "cbsd"
HEAVY = {"re", "json", "enum", "typing", "pathlib", "dataclasses", "socket", "sqlite3",
         "threading", "subprocess", "cbsd.storage.inventory", "cbsd.core.manage.lifecycle"}


def launched(cbsd: Cbsd, *args: str) -> tuple[Result, set[str]]:
    """Run the installed launcher; also return every module the command imported."""
    p = subprocess.run([sys.executable, "-IS", "-X", "importtime", str(LAUNCHER), *args],
                       capture_output=True, text=True, env=cbsd.env, timeout=60)
    lines = p.stderr.splitlines(keepends=True)
    mods = {ln.rsplit("|", 1)[1].strip() for ln in lines if ln.startswith("import time:")}
    err = "".join(ln for ln in lines if not ln.startswith("import time:"))
    return Result(p.returncode, p.stdout, err), mods - {"imported package"}


def test_pause_freezes_and_resume_continues(cbsd: Cbsd, running_counter: str) -> None:
    con = cbsd.console("vm1")
    assert cbsd("bpause", "vm1", "mode=on").ok().out.strip() == "vm1: paused"
    assert cbsd.status("vm1") == "Paused"
    last = counter_lines(con.text())[-1][0]
    mark = con.mark()
    time.sleep(1.0)
    assert con.since(mark) == "", "a paused guest prints nothing"
    assert cbsd.pid("vm1") > 0, "paused keeps the process and its memory"
    assert cbsd("bpause", "vm1", "mode=off").ok().out.strip() == "vm1: resumed"
    con.wait(COUNTER_RE, since=mark, count=2)
    resumed = counter_lines(con.since(mark))
    assert resumed[0][0] == last + 1, "the same count continues"
    assert resumed[0][2] == "OK"


def test_a_plain_pause_takes_the_quick_lane(cbsd: Cbsd, running_counter: str) -> None:
    con = cbsd.console("vm1")
    r, mods = launched(cbsd, "bpause", "jname=vm1", "mode=on")
    assert r.ok().out == "vm1: paused\n"
    assert "cbsd.core.vm.pause" in mods and not mods & HEAVY, sorted(mods & HEAVY)
    assert cbsd.status("vm1") == "Paused"
    last = counter_lines(con.text())[-1][0]
    mark = con.mark()
    time.sleep(0.5)
    assert con.since(mark) == "", "a paused guest prints nothing"
    r, mods = launched(cbsd, "bpause", "vm1")  # auto: resume
    assert r.ok().out == "vm1: resumed\n"
    assert not mods & HEAVY
    con.wait(COUNTER_RE, since=mark)
    n, _, ok = counter_lines(con.since(mark))[0]
    assert (n, ok) == (last + 1, "OK"), "the same count continues"



def test_a_lock_left_by_a_dead_command_sends_bpause_the_full_way(
        cbsd: Cbsd, running_counter: str) -> None:
    lock = cbsd.workdir / "var" / "lock" / "vm1.lock"
    lock.write_text("999999 bcheckpoint create\n")  # its holder was kill -9'd mid-command
    r, mods = launched(cbsd, "bpause", "vm1", "mode=on")
    assert r.ok().out == "vm1: paused\n"
    assert "cbsd.core.vm.recovery" in mods, "the full command runs recovery first"
    assert lock.read_text() == ""
    assert cbsd.status("vm1") == "Paused"


def test_the_launcher_starts_python_isolated(cbsd: Cbsd) -> None:
    assert LAUNCHER.read_text().splitlines()[0].endswith(" -IS")
    p = subprocess.run([str(LAUNCHER), "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("cbsd ")


def test_auto_toggles(cbsd: Cbsd, running_counter: str) -> None:
    assert cbsd("bpause", "vm1").ok().out.strip() == "vm1: paused"
    assert cbsd.status("vm1") == "Paused"
    assert cbsd("bpause", "vm1", "mode=auto").ok().out.strip() == "vm1: resumed"
    assert cbsd.status("vm1") == "On"


def test_wrong_state(cbsd: Cbsd, running_counter: str) -> None:
    r = cbsd("bpause", "vm1", "mode=off")
    assert r.code == 1 and "vm1: is On: cannot resume it" in r.err
    cbsd("bpause", "vm1", "mode=on").ok()
    r = cbsd("bpause", "vm1", "mode=on")
    assert r.code == 1 and "vm1: is Paused: cannot pause it" in r.err


def test_stop_a_paused_vm_promptly(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bpause", "vm1", "mode=on").ok()
    t = time.monotonic()
    cbsd("bstop", "vm1", "noacpi=1").ok()
    assert time.monotonic() - t < 5
    assert cbsd.status("vm1") == "Off"
    cbsd("bstart", "vm1", "paused=1").ok()
    assert cbsd.status("vm1") == "Paused"
    # ACPI cannot reach a frozen guest: cbsd resumes it first and says so.
    r = cbsd("bstop", "vm1", "hard_timeout=1").ok()
    assert "was paused: resumed it so it can act on the ACPI power button" in r.err
    assert cbsd.status("vm1") == "Off"


def test_start_paused_then_resume_boots(cbsd: Cbsd, counter_vm: str) -> None:
    con = cbsd.console("vm1")
    assert cbsd("bstart", "vm1", "paused=1").ok().out.strip() == "vm1: started (paused)"
    assert cbsd.status("vm1") == "Paused"
    time.sleep(0.5)
    assert "BOOT" not in con.text()
    cbsd("bpause", "vm1", "mode=off").ok()
    con.wait(r"BOOT disk=0")
