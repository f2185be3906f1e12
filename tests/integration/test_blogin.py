"""blogin attaches a terminal to the serial console; Ctrl-] detaches."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tests.harness import Cbsd

pytestmark = pytest.mark.vm


def test_blogin_shows_the_console_and_detaches(cbsd: Cbsd, running_counter: str) -> None:
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "cbsd", "blogin", "jname=vm1"], stdin=slave,
                         stdout=slave, stderr=slave, env=cbsd.env, close_fds=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 20
    while seen.count(b"n=") < 3 and time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            seen += os.read(master, 4096)
    assert b"Escape character is ^]" in seen
    assert seen.count(b"n=") >= 3, seen[-300:]
    os.write(master, b"\x1d")
    assert p.wait(10) == 0
    try:
        while select.select([master], [], [], 0.2)[0]:
            seen += os.read(master, 4096)
    except OSError:
        pass
    assert b"Detached from vm1's console" in seen
    os.close(master)
    assert cbsd.status("vm1") == "On", "detaching leaves the VM running"


def test_blogin_refuses_a_stopped_vm(cbsd: Cbsd, counter_vm: str) -> None:
    r = cbsd("blogin", "vm1")
    assert r.code == 1 and "vm1: is Off" in r.err
