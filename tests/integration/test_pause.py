"""bpause: frozen guests print nothing, resumed ones continue the same count."""

from __future__ import annotations

import time

import pytest

from tests.conftest import COUNTER_RE, Cbsd, counter_lines

pytestmark = pytest.mark.vm


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
