"""The commands a CBSD user types every day (issue 23 part 4): brestart, bstop checkpoint=1,
bwhereis and bunregister, through the CLI against real guests (the boot-sector counter guest:
a reboot starts its count at n=1 after a BOOT line; a resume continues it)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import time

import pytest

from tests.harness import COUNTER_RE, Cbsd

pytestmark = pytest.mark.vm


def counts(text: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(COUNTER_RE, text)]


def last_count(cbsd: Cbsd, jname: str) -> int:
    """The guest's counter once it has printed two more lines (it is counting)."""
    con = cbsd.console(jname)
    mark = con.mark()
    con.wait(COUNTER_RE, since=mark, count=2)
    return counts(con.since(mark))[-1]


def first_count_after_boot(cbsd: Cbsd, jname: str, mark: int) -> int:
    """The guest's first count after its next BOOT line past *mark* (lines it printed before
    it was stopped may follow the mark)."""
    con = cbsd.console(jname)
    con.wait("BOOT disk=", since=mark)
    boot = mark + con.since(mark).rindex("BOOT disk=")
    con.wait(COUNTER_RE, since=boot)
    return counts(con.since(boot))[0]


def fold_finished(cbsd: Cbsd, timeout: float = 120) -> None:
    """Wait until no background fold (core/checkpoint/fold.py, started by a checkpoint where
    RAM is not a file) works on this workdir: the files are then changed only by commands."""
    deadline = time.monotonic() + timeout
    needle = str(cbsd.workdir).encode()
    while True:
        busy = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
                busy = busy or (b"checkpoint.fold" in cmd and needle in cmd)
        if not busy:
            return
        assert time.monotonic() < deadline, "the background fold did not end"
        time.sleep(0.1)


def files_of(cbsd: Cbsd, jname: str) -> dict[str, str]:
    """Every file of the VM (its folders under jails-system/ and vm/) with a digest of its
    contents; sockets and the like by kind only."""
    out: dict[str, str] = {}
    for root in (cbsd.system(jname), cbsd.workdir / "vm" / jname):
        for p in sorted(root.rglob("*")):
            rel = str(p.relative_to(cbsd.workdir))
            if p.is_file() and not p.is_symlink():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[rel] = "dir"
    return out


# --- brestart ------------------------------------------------------------------------------

def test_brestart_reboots_a_running_and_a_paused_guest(cbsd: Cbsd,
                                                      running_counter: str) -> None:
    con = cbsd.console("vm1")
    for paused in (False, True):
        assert last_count(cbsd, "vm1") >= 3  # counting since the last boot
        pid = cbsd.pid("vm1")
        if paused:
            cbsd("bpause", "vm1", "mode=on").ok()
        mark = con.mark()
        # The counter guest ignores the power button: the ACPI stop falls back to power-off.
        r = cbsd("brestart", "jname=vm1", "hard_timeout=1").ok()
        assert r.out.splitlines() == ["vm1: did not shut down within 1 s: powered off",
                                      "vm1: started"], r.out
        assert cbsd.status("vm1") == "On" and cbsd.pid("vm1") != pid
        assert first_count_after_boot(cbsd, "vm1", mark) == 1, "rebooted: counts from 1"
    # noacpi=1: powered off at once, then started
    mark = con.mark()
    r = cbsd("brestart", "vm1", "noacpi=1").ok()
    assert r.out.splitlines() == ["vm1: powered off", "vm1: started"], r.out
    assert first_count_after_boot(cbsd, "vm1", mark) == 1


def test_brestart_refuses_a_vm_that_is_not_running(cbsd: Cbsd, counter_vm: str) -> None:
    cbsd("brestart", "vm1").fails(1, "vm1: not running: nothing to restart")
    assert cbsd.status("vm1") == "Off", "an Off VM is not started by brestart"
    cbsd("brestart", "vm1", "noacpi=1").fails(1, "vm1: not running: nothing to restart")
    assert cbsd.status("vm1") == "Off"
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)
    cbsd("bsuspend", "vm1").ok()
    cbsd("brestart", "vm1").fails(1, "vm1: is hibernated: a restart would throw")
    assert cbsd.status("vm1") == "Suspended", "the hibernation image is kept"


def test_brestart_noacpi_restarts_a_wedged_qemu(cbsd: Cbsd, running_counter: str) -> None:
    pid = cbsd.pid("vm1")
    os.kill(pid, signal.SIGSTOP)  # QEMU answers nothing, not even its monitor
    try:
        # the ACPI way needs the monitor: refused, one line naming the way out
        cbsd("brestart", "vm1").fails(1, "does not answer its monitor")
        mark = cbsd.console("vm1").mark()
        r = cbsd("brestart", "vm1", "noacpi=1").ok()
        assert r.out.splitlines() == ["vm1: powered off", "vm1: started"], r.out
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert cbsd.status("vm1") == "On" and cbsd.pid("vm1") != pid
    assert first_count_after_boot(cbsd, "vm1", mark) == 1


def test_kill9_of_brestart_between_stop_and_start_leaves_it_off(cbsd: Cbsd,
                                                                 running_counter: str) -> None:
    stopped = cbsd.at_failpoint("brestart:stopped", "brestart", "vm1", "noacpi=1")
    stopped.kill9()
    assert cbsd.status("vm1") == "Off", "stopped, and nothing half started"
    cbsd("brestart", "vm1").fails(1, "vm1: not running")
    mark = cbsd.console("vm1").mark()
    cbsd("bstart", "vm1").ok()
    assert first_count_after_boot(cbsd, "vm1", mark) == 1


# --- bstop checkpoint=1 ----------------------------------------------------------------------

def test_bstop_checkpoint_hibernates_and_bstart_continues(cbsd: Cbsd,
                                                          running_counter: str) -> None:
    con = cbsd.console("vm1")
    before = last_count(cbsd, "vm1")
    boots = con.text().count("BOOT disk=")
    r = cbsd("bstop", "jname=vm1", "checkpoint=1").ok()
    assert r.out.strip() == "vm1: hibernated"
    assert cbsd.status("vm1") == "Suspended"
    assert cbsd.bls("vm1")[0]["jid"] == 0, "QEMU ended: its RAM is freed"
    mark = con.mark()
    assert cbsd("bstart", "vm1").ok().out.strip() == "vm1: resumed from hibernation"
    con.wait(COUNTER_RE, since=mark, count=2)
    assert counts(con.since(mark))[0] > before, "the guest continues where it was"
    assert con.text().count("BOOT disk=") == boots, "not rebooted"
    # as bsuspend: a VM that is not running is refused, nothing changed
    cbsd("bstop", "vm1", "noacpi=1").ok()
    cbsd("bstop", "vm1", "checkpoint=1").fails(1, "vm1: is Off: cannot hibernate it")
    assert cbsd.status("vm1") == "Off"


# --- bwhereis --------------------------------------------------------------------------------

def test_bwhereis_local_and_unknown(cbsd: Cbsd, counter_vm: str) -> None:
    assert cbsd("bwhereis", "jname=vm1").ok().out == "local\n"
    assert cbsd("bwhereis", "vm1").ok().out == "local\n"
    cbsd("bwhereis", "jname=nosuch").fails(1, "nosuch: not found on this host")
    cbsd("bunregister", "vm1").ok()
    # its files are still here: the line says how to get it back
    cbsd("bwhereis", "vm1").fails(1, "'cbsd bregister jname=vm1'")


@pytest.mark.twohost
def test_bwhereis_names_the_node_that_has_it(two, counter_image) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    a.trust(b)
    a.cbsd("node", "mode=add", "name=b", f"host=root@{b.addr}").ok()
    image = counter_image()
    a.cbsd("bcreate", "jname=here", f"image={image}", "vm_os_type=other", "vm_ram=32m").ok()
    b.cbsd("bcreate", "jname=there", f"image={image}", "vm_os_type=other",
           "vm_ram=32m").ok()
    assert a.cbsd("bwhereis", "jname=here").ok().out == "local\n"
    assert a.cbsd("bwhereis", "jname=there").ok().out == "b\n"
    a.cbsd("bwhereis", "jname=nosuch").fails(1, "nosuch: not found on this host or any node")
    # a node that cannot be reached is named in the one line: the answer may be incomplete
    assert b.sshd is not None
    b.sshd.terminate()
    b.sshd.wait(10)
    a.cbsd("bwhereis", "jname=there").fails(1, "node b: cannot reach")


# --- bunregister -----------------------------------------------------------------------------

def test_bunregister_keeps_every_file_and_bregister_restores(cbsd: Cbsd, running_counter: str,
                                                             counter_image) -> None:  # type: ignore[no-untyped-def]
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=ck1").ok()
    fold_finished(cbsd)
    cbsd("bunregister", "vm1").fails(1, "vm1: is running: stop it first")
    assert cbsd.status("vm1") == "On"
    cbsd("bpause", "vm1", "mode=on").ok()
    cbsd("bunregister", "vm1").fails(1, "vm1: is running (paused): stop it first")
    cbsd("bstop", "vm1", "noacpi=1").ok()
    kept = files_of(cbsd, "vm1")
    assert any(p.endswith("vm.json") for p in kept) and any("ck1" in p for p in kept)

    r = cbsd("bunregister", "jname=vm1").ok()
    assert r.out.startswith("vm1: unregistered")
    assert cbsd.bls() == []
    assert files_of(cbsd, "vm1") == kept, "every file kept, unchanged"
    cbsd("bstart", "vm1").fails(2, "No such VM: vm1")
    cbsd("bunregister", "vm1").fails(2, "No such VM: vm1")
    assert cbsd("__complete", "jname=", "bregister").ok().out == "jname=vm1\n"

    # bcreate of the same name does not touch the kept files: refused, they exist
    cbsd("bcreate", "jname=vm1", f"image={counter_image(name='other.raw')}",
         "vm_os_type=other", "vm_ram=32m").fails(1, "files of a VM by that name exist")
    assert files_of(cbsd, "vm1") == kept
    assert cbsd.bls() == []

    assert cbsd("bregister", "jname=vm1").ok().out.strip() == "vm1: registered"
    assert [v["jname"] for v in cbsd.bls()] == ["vm1"]
    assert [c["name"] for c in cbsd.checkpoints("vm1")] == ["ck1"]
    r = cbsd("bstart", "vm1", "checkpoint=ck1").ok()  # its checkpoint restores
    assert r.out.strip() == "vm1: restored from checkpoint ck1"
    cbsd.console("vm1").wait(COUNTER_RE, count=2)
    assert cbsd.status("vm1") == "On"


def test_a_hibernated_vm_unregistered_and_registered_resumes(cbsd: Cbsd,
                                                             running_counter: str) -> None:
    before = last_count(cbsd, "vm1")
    cbsd("bstop", "vm1", "checkpoint=1").ok()
    cbsd("bunregister", "vm1").ok()
    assert cbsd.bls() == []
    cbsd("bregister", "vm1").ok()
    assert cbsd.status("vm1") == "Suspended", "the hibernation image came back with it"
    con = cbsd.console("vm1")
    mark = con.mark()
    cbsd("bstart", "vm1").ok()
    con.wait(COUNTER_RE, since=mark, count=1)
    assert counts(con.since(mark))[0] > before


def test_kill9_of_bunregister_leaves_a_whole_vm(cbsd: Cbsd, counter_vm: str,
                                               counter_image) -> None:  # type: ignore[no-untyped-def]
    kept = files_of(cbsd, "vm1")
    stopped = cbsd.at_failpoint("bunregister:saved", "bunregister", "vm1")
    stopped.kill9()
    # killed after vm.json was written and before the entry went: still a registered VM
    assert [v["jname"] for v in cbsd.bls()] == ["vm1"]
    assert files_of(cbsd, "vm1") == kept
    assert json.loads((cbsd.system("vm1") / "vm.json").read_text())["jname"] == "vm1"
    cbsd("bunregister", "vm1").ok()
    cbsd("bcreate", "jname=vm1", f"image={counter_image(name='other.raw')}",
         "vm_os_type=other", "vm_ram=32m").fails(1, "files of a VM by that name exist")
    assert files_of(cbsd, "vm1") == kept
    cbsd("bregister", "vm1").ok()
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "grep"), [
    (("brestart",), "brestart: missing required key 'jname'"),
    (("brestart", "vm1", "hard_timeout=soon"), "brestart: bad value for hard_timeout"),
    (("brestart", "nosuch"), "No such VM: nosuch"),
    (("brestart", "jname=no*"), "No VM matches the mask: no*"),
    (("bstop", "vm1", "checkpoint=1", "noacpi=1"), "bstop: noacpi= is not used with "
                                                    "checkpoint=1"),
    (("bstop", "vm1", "checkpoint=1", "hard_timeout=5"), "bstop: hard_timeout= is not used "
                                                         "with checkpoint=1"),
    (("bstop", "vm1", "checkpoint=maybe"), "bstop: bad value for checkpoint"),
    (("bwhereis",), "bwhereis: missing required key 'jname'"),
    (("bwhereis", "jname=vm*"), "bad jname 'vm*'"),
    (("bwhereis", "vm1", "vm2"), "bwhereis: takes one VM name, got 2"),
    (("bwhereis", "vm1", "node=b"), "bwhereis: unknown key 'node'"),
    (("bunregister",), "bunregister: missing required key 'jname'"),
    (("bunregister", "nosuch"), "No such VM: nosuch"),
    (("bunregister", "jname=../vm1"), "bad jname '../vm1'"),
])
def test_bad_input_is_one_line_and_exit_2(cbsd: Cbsd, counter_vm: str, args: tuple[str, ...],
                                          grep: str) -> None:
    before = files_of(cbsd, "vm1")
    cbsd(*args).fails(2, grep)
    assert cbsd.status("vm1") == "Off" and files_of(cbsd, "vm1") == before, "nothing changed"


def test_help_and_man_page_name_the_new_commands(cbsd: Cbsd) -> None:
    for cmd, key in (("brestart", "hard_timeout"), ("bwhereis", "jname"),
                     ("bunregister", "jname"), ("bstop", "checkpoint")):
        out = cbsd(cmd, "--help").ok().out
        assert out.startswith(f"usage: cbsd {cmd} ") and f"  {key} " in out, out
    listing = cbsd("--help").ok().out  # the command list names each
    for cmd in ("brestart", "bwhereis", "bunregister"):
        assert f"  {cmd} " in listing
