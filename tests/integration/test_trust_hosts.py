"""Trust between hosts, through the CLI against real guests (issue 26, items 6-11 and the
node answers of item 1): bexport never replaces a file that appeared while it ran; what a
node answers to bls is validated and a node that hangs costs a short deadline; an ssh
forwarder dies with bmigrate; interrupted moves are settled by what the node holds (also
when removing the node); cbsd0 belongs to one workdir per host. The two-host tests run in
two network namespaces (tests/guests/hosts.py)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.guests import hosts as twohosts
from tests.guests.hosts import joined, moved, stopped_at, stopped_node_half
from tests.guests.netns import Netns
from tests.harness import Cbsd, kill_vms, qemu_processes
from tests.vmchecks import counting, restored_from, running_vm1, vm_with_checkpoints

pytestmark = [pytest.mark.vm]


def stopped_vm1_with_c1(a: twohosts.Host, b: twohosts.Host,
                        image: Path) -> dict[str, tuple[int, int]]:
    """b a node of a; vm1 on a, stopped, with checkpoint c1 (its console marks)."""
    joined(a, b)
    marks = vm_with_checkpoints(a.cbsd, image, "c1")
    a.cbsd("bstop", "vm1", "noacpi=1").ok()
    return marks


def killed_at(cbsd: Cbsd, point: str, *args: str) -> None:
    """The command, killed -9 where it stops at failpoint *point*."""
    p = stopped_at(cbsd, point, *args)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def wait_until(cond, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def processes(*needles: bytes) -> list[int]:
    """Pids whose command line holds every one of *needles*."""
    found = []
    for pid in (int(x) for x in os.listdir("/proc") if x.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if all(n in cmd for n in needles):
            found.append(pid)
    return found


# --- 6: bexport never replaces ------------------------------------------------------------

def test_bexport_never_replaces_a_file_created_while_it_ran(cbsd: Cbsd, counter_image,  # type: ignore[no-untyped-def]
                                                            tmp_path: Path) -> None:
    cbsd("bcreate", "jname=vm1", f"image={counter_image(fill_mib=1)}", "vm_os_type=other",
         "vm_ram=32m").ok()
    target = tmp_path / "vm1.cbsd"
    stopped = cbsd.at_failpoint("bexport:written", "bexport", "jname=vm1", f"out={target}")
    target.write_text("someone else's file\n")  # appears after the check at the start
    stopped.resume().fails(2, "was created while the export ran")
    assert target.read_text() == "someone else's file\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".vm1")] == []
    cbsd("bexport", "jname=vm1", f"out={tmp_path / 'other.cbsd'}").ok()  # and it exports


# --- 8 and 1: what a node answers to bls --------------------------------------------------

@pytest.mark.twohost
@pytest.mark.parametrize("answer", ["another shape", "rows of another shape",
                                    "a terminal escape", "a status that is a list",
                                    "nested beyond reason", "hangs"])
def test_bls_of_all_nodes_lists_the_others_whatever_one_node_answers(two, counter_image,  # type: ignore[no-untyped-def]
                                                                     answer: str) -> None:
    a, b = two
    joined(a, b)
    a.cbsd("bcreate", "jname=here", f"image={counter_image(fill_mib=1)}", "vm_os_type=other",
           "vm_ram=32m").ok()
    rows = {"another shape": '{"vms": []}',
            "rows of another shape": '[{"name": "x", "state": "up"}]',
            "a terminal escape": json.dumps([{
                "jname": "x", "jid": 0, "vm_ram": 1, "vm_curmem": 0, "vm_cpus": 1, "pcpu": 0,
                "vm_os_type": "\x1b]2;owned\x07", "ip4_addr": "-", "status": "Off",
                "vnc_port": "0"}]),
            "a status that is a list": json.dumps([{
                "jname": "x", "jid": 0, "vm_ram": 1, "vm_curmem": 0, "vm_cpus": 1, "pcpu": 0,
                "vm_os_type": "linux", "ip4_addr": "-", "status": ["Off"], "vnc_port": "0"}]),
            }.get(answer)
    script = "exec sleep 200" if answer == "hangs" else \
        "exec python3 -c 'print(\"[\" * 100000 + \"]\" * 100000)'" \
        if answer == "nested beyond reason" else f"echo '{rows}'"
    if answer == "hangs":
        a.cbsd.env["CBSD_NODE_TIMEOUT"] = "5"  # the others: the default, as users have it
    with b.cbsd_as(script):
        started = time.monotonic()
        r = a.cbsd("bls", "node=*", "format=json", timeout=300)
        took = time.monotonic() - started
        assert r.code == 1 and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
        assert r.err.startswith("node b: ") and "\x1b" not in r.err, r.err
        assert {"hangs": "no answer", "nested beyond reason": "what is not JSON"}.get(
            answer, "not what cbsd expects") in r.err
        assert [(x["node"], x["jname"]) for x in json.loads(r.out)] == [("local", "here")]
        # a node that hangs costs its deadline (5 s here), not the 200 s it sleeps
        assert took < 90, took
        a.cbsd("bls", "node=b").fails(1, "node b: ")


# --- 9: the ssh forwarder dies with bmigrate ----------------------------------------------

@pytest.mark.twohost
def test_kill9_of_bmigrate_with_its_forward_up_leaves_no_ssh_behind(two, counter_image) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    joined(a, b)
    running_vm1(a.cbsd, counter_image(fill_mib=2))
    p = stopped_at(a.cbsd, "bmigrate:forwarded", "bmigrate", "jname=vm1", "node=b")
    sock = str(a.cbsd.system("vm1") / "nbd.sock").encode()
    forwarders = processes(b"ssh\x00", b"-N\x00", sock)
    assert len(forwarders) == 1, forwarders  # up, and not yet named in any intent
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    wait_until(lambda: not processes(b"ssh\x00", b"-N\x00", sock),
               "the forwarder outlived the bmigrate that started it")
    # its session on the node ends with it, and the node's half clears what it received
    wait_until(lambda: not processes(b"bmigrate\x00mode=incoming"), "the node's half lives on")
    wait_until(lambda: not qemu_processes(b.cbsd.workdir), "the node's QEMU lives on")
    assert a.cbsd.status("vm1") == "On"
    assert b.cbsd("bls", "header=0").ok().out == ""


# --- 7: node mode=remove and an interrupted move ------------------------------------------

@pytest.mark.twohost
def test_node_remove_settles_an_interrupted_move_or_refuses_saying_how_out(two,  # type: ignore[no-untyped-def]
                                                                          counter_image) -> None:
    a, b = two
    marks = stopped_vm1_with_c1(a, b, counter_image(fill_mib=2))
    staging = b.cbsd.workdir / "var" / "tmp"
    # Killed once b staged the VM: removing b settles the move first (b drops its copy).
    killed_at(a.cbsd, "bmove:staged", "bmove", "jname=vm1", "node=b")
    a.cbsd("node", "mode=remove", "name=b").ok()
    a.cbsd("bset", "jname=vm1", "astart=0").ok()  # usable here, not held for good
    assert not any(staging.iterdir()) and b.cbsd("bls", "header=0").ok().out == ""
    # Killed with the commit possibly sent, b unreachable: only b can tell, so b is kept and
    # every refusal says how out; once b answers, removing it settles the move.
    a.cbsd("node", "mode=add", "name=b", f"host=root@{b.addr}").ok()
    killed_at(a.cbsd, "bmove:committing", "bmove", "jname=vm1", "node=b")
    b.link(False)
    a.cbsd("node", "mode=remove", "name=b").fails(1, "is gone for good, delete")
    a.cbsd("bset", "jname=vm1", "astart=0").fails(1, "is gone for good, delete")
    assert json.loads(a.cbsd("node", "mode=list", "format=json").ok().out)[0]["name"] == "b"
    b.link(True)
    a.cbsd("node", "mode=remove", "name=b").ok()
    restored_from(a.cbsd, "vm1", "c1", marks["c1"])  # intact here, never moved
    assert b.cbsd("bls", "header=0").ok().out == ""


@pytest.mark.twohost
def test_a_move_whose_commit_never_went_out_is_settled_without_the_node(two,  # type: ignore[no-untyped-def]
                                                                       counter_image) -> None:
    a, b = two
    marks = stopped_vm1_with_c1(a, b, counter_image(fill_mib=2))
    killed_at(a.cbsd, "bmove:staged", "bmove", "jname=vm1", "node=b")
    b.link(False)  # b gone: it never got the commit, so the VM is here only
    a.cbsd("bset", "jname=vm1", "astart=0").ok()
    assert not (a.cbsd.system("vm1") / "moving").exists()
    restored_from(a.cbsd, "vm1", "c1", marks["c1"])
    b.link(True)
    assert b.cbsd("bls", "header=0").ok().out == ""  # what it staged is never registered


# --- 10: a commit killed after registering ------------------------------------------------

@pytest.mark.twohost
def test_bmove_whose_commit_was_killed_after_registering_reports_the_move(two,  # type: ignore[no-untyped-def]
                                                                         counter_image) -> None:
    a, b = two
    joined(a, b)
    before = running_vm1(a.cbsd, counter_image(fill_mib=2))
    with b.cbsd_as(f"CBSD_FAILPOINT=bimport:registered {b.real_cbsd}"):
        p = a.cbsd.popen("bmove", "jname=vm1", "node=b")
        victim = stopped_node_half(b"bimport\x00mode=commit", p)
        os.kill(victim, signal.SIGKILL)
        out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "moved to node b, running there" in out, out
    moved(a, b)
    assert b.cbsd.status("vm1") == "On"  # running, as it was here
    assert counting(b.cbsd, "vm1") >= before
    assert not (a.cbsd.system("vm1") / "moving").exists()
    assert qemu_processes(a.cbsd.workdir) == []


# --- 11: cbsd0 belongs to one workdir -----------------------------------------------------

def test_cbsd0_belongs_to_one_workdir_and_another_is_refused_naming_it(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                       counter_image) -> None:
    ns = Netns.create("own")
    first = Cbsd(tmp_path / "wd1", prefix=ns.prefix)
    second = Cbsd(tmp_path / "wd2", prefix=ns.prefix)
    try:
        image = counter_image(fill_mib=1)
        for c in (first, second):
            c("bcreate", "jname=vm1", f"image={image}", "vm_os_type=other", "vm_ram=32m",
              "nic=bridge").ok()
        first("bstart", "vm1").ok()
        second("bstart", "vm1").fails(1, f"cbsd0 belongs to the workdir {first.workdir}")
        assert second.status("vm1") == "Off"
        assert first.status("vm1") == "On"
        assert str(first.workdir) in ns.run("ip", "link", "show", "cbsd0").stdout
        first("bstop", "vm1", "noacpi=1").ok()
        first("bstart", "vm1").ok()  # its owner goes on using it
    finally:
        for c in (first, second):
            kill_vms(c.workdir)
            pidfile = c.workdir / "var" / "run" / "dnsmasq-cbsd0.pid"
            if pidfile.exists():
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
        ns.delete()
