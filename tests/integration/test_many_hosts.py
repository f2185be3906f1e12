"""bexport/bimport, nodes over SSH and bmove, through the CLI against real QEMU guests; the
two-host tests run in two network namespaces, each with its own sshd and workdir
(tests/guests/hosts.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guests.hosts import (
    joined,
    kill_cbsd_running,
    moved,
    node_half_killed,
    stopped_at,
    stopped_node_half,
)
from tests.harness import Cbsd, kill_vms, qemu_processes
from tests.vmchecks import (
    counting,
    first_after,
    leftovers,
    restored_from,
    running_vm1,
    vm_with_checkpoints,
)

pytestmark = [pytest.mark.vm]


@pytest.fixture
def other(tmp_path: Path) -> Iterator[Cbsd]:
    runner = Cbsd(tmp_path / "wd2")
    yield runner
    kill_vms(runner.workdir)


# --- export / import on one host ----------------------------------------------------------

def test_export_import_by_file_and_by_stream(cbsd: Cbsd, other: Cbsd, counter_image,  # type: ignore[no-untyped-def]
                                             tmp_path: Path) -> None:
    marks = vm_with_checkpoints(cbsd, counter_image(fill_mib=8), "c1", "c2")
    cbsd("bstop", "vm1", "noacpi=1").ok()
    archive = tmp_path / "vm1.cbsd"
    r = cbsd("bexport", "jname=vm1", f"out={archive}").ok()
    assert "2 saved states" in r.out and archive.stat().st_mode & 0o077 == 0
    listing = subprocess.run(["tar", "tf", str(archive)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert listing[0] == "cbsd-export.json" and listing[-1] == "cbsd-export.seal"
    assert "checkpoints/c1.ckp/memory" in listing and "vm/dsk1.qcow2" in listing
    other("bimport", f"in={archive}").ok()
    assert [c["name"] for c in other.checkpoints("vm1")] == ["c1", "c2"]
    assert other.checkpoints("vm1")[1]["parent"] == "c1"  # the tree travels
    restored_from(other, "vm1", "c2", marks["c2"])
    restored_from(other, "vm1", "c1", marks["c1"])
    # By stream, one checkpoint only, under another name: bexport out=- | bimport in=-
    exp = subprocess.Popen([sys.executable, "-m", "cbsd", "bexport", "jname=vm1", "out=-",
                            "checkpoints=c1"], env=cbsd.env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    imp = subprocess.run([sys.executable, "-m", "cbsd", "bimport", "in=-", "jname=copy"],
                         env=other.env, stdin=exp.stdout, capture_output=True, text=True)
    assert exp.wait() == 0 and imp.returncode == 0, (exp.stderr.read(), imp.stderr)  # type: ignore[union-attr]
    assert [c["name"] for c in other.checkpoints("copy")] == ["c1"]
    restored_from(other, "copy", "c1", marks["c1"])
    other("bimport", f"in={archive}").fails(1, "VM already exist: vm1")


def _flip(data: bytearray, at: int) -> bytearray:
    data[at] ^= 0x01
    return data


def _edit_header(data: bytearray) -> bytearray:
    i = data.index(b'"ram": ')
    j = data.index(b",", i)
    data[i:j] = b'"ram": ' + str(64 << 20).encode().rjust(j - i - 7)
    return data


TAMPER = {
    "flipped byte in a disk": (lambda d: _flip(d, len(d) // 2), 2, "does not match its checksum"),
    "truncated": (lambda d: d[: len(d) // 3], 2, "truncated"),
    "edited header": (_edit_header, 2, "cbsd-export.json in the archive does not match"),
    "not an archive": (lambda d: bytearray(b"hello\n" * 200), 2, "not a cbsd export archive"),
    "no seal": (lambda d: d[: d.rindex(b"cbsd-export.seal") - 512], 2, "truncated"),
}


@pytest.mark.parametrize("kind", sorted(TAMPER))
def test_a_tampered_archive_is_refused_and_leaves_nothing(cbsd: Cbsd, other: Cbsd,  # type: ignore[no-untyped-def]
                                                          counter_image, tmp_path: Path,
                                                          kind: str) -> None:
    change, code, message = TAMPER[kind]
    vm_with_checkpoints(cbsd, counter_image(fill_mib=2), "c1")
    cbsd("bstop", "vm1", "noacpi=1").ok()
    archive = tmp_path / "vm1.cbsd"
    cbsd("bexport", "jname=vm1", f"out={archive}").ok()
    archive.write_bytes(change(bytearray(archive.read_bytes())))
    other("bimport", f"in={archive}").fails(code, message)
    assert other("bls", "header=0").ok().out == "" and leftovers(other) == []


def test_export_refuses_a_running_vm_unless_it_may_hibernate_it(cbsd: Cbsd, other: Cbsd,  # type: ignore[no-untyped-def]
                                                               counter_image,
                                                               tmp_path: Path) -> None:
    vm_with_checkpoints(cbsd, counter_image(fill_mib=2), "c1")
    archive = tmp_path / "vm1.cbsd"
    cbsd("bexport", "jname=vm1", f"out={archive}").fails(1, "suspend=1")
    assert not archive.exists() and list(tmp_path.glob(".vm1.cbsd*")) == []
    before = counting(cbsd, "vm1")
    cbsd("bexport", "jname=vm1", f"out={archive}", "suspend=1").ok()
    assert cbsd.status("vm1") == "Suspended"
    cbsd("bexport", "jname=vm1", f"out={archive}").fails(2, "exists")
    other("bimport", f"in={archive}").ok()
    assert other.status("vm1") == "Suspended"
    other("bstart", "vm1").ok()  # resumes the hibernation where it was
    assert first_after(other, "vm1", 0) >= before


# --- two hosts ----------------------------------------------------------------------------

@pytest.mark.twohost
def test_nodes_are_added_only_with_a_known_host_key(two) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    a.cbsd("node", "mode=add", "name=b", f"host=root@{b.addr}").fails(1, "host key")
    assert a.cbsd("node", "mode=list", "format=json").ok().out.strip() == "[]"
    joined(a, b)
    rows = json.loads(a.cbsd("node", "mode=list", "format=json").ok().out)
    assert rows == [{"name": "b", "host": f"root@{b.addr}", "port": 22}]
    a.cbsd("node", "mode=add", "name=b", f"host=root@{b.addr}").fails(2, "already exists")
    a.cbsd("node", "mode=add", "name=c", "host=-oProxyCommand=x").fails(2, "bad host")
    a.cbsd("bls", "node=nosuch").fails(2, "no node nosuch")
    a.cbsd("node", "mode=remove", "name=b").ok()
    assert a.cbsd("node", "mode=list", "format=json").ok().out.strip() == "[]"


@pytest.mark.twohost
def test_bls_across_nodes_and_commands_forwarded_with_node(two, counter_image) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    joined(a, b)
    image = counter_image(fill_mib=1)
    a.cbsd("bcreate", "jname=here", f"image={image}", "vm_os_type=other", "vm_ram=32m").ok()
    b.cbsd("bcreate", "jname=there", f"image={image}", "vm_os_type=other",
           "vm_ram=32m").ok()
    a.cbsd("bstart", "jname=there", "node=b").ok()  # acts on b
    assert b.cbsd.status("there") == "On"
    rows = json.loads(a.cbsd("bls", "node=*", "format=json").ok().out)
    assert {(r["node"], r["jname"], r["status"]) for r in rows} == {
        ("local", "here", "Off"), ("b", "there", "On")}
    assert a.cbsd("bls", "node=b").ok().out.split()[:2] == ["NODE", "JNAME"]
    a.cbsd("bstop", "jname=there", "node=b", "noacpi=1").ok()
    a.cbsd("bstart", "jname=nosuch", "node=b").fails(2, "No such VM: nosuch")
    # A node that cannot be reached: named on stderr, the others still listed, exit 1.
    assert b.sshd is not None
    b.sshd.terminate()
    b.sshd.wait(10)
    r = a.cbsd("bls", "node=*", "format=json")
    assert r.code == 1 and "node b: cannot reach" in r.err and r.err.count("\n") == 1, r.err
    assert [(x["node"], x["jname"]) for x in json.loads(r.out)] == [("local", "here")]
    a.cbsd("bls", "node=b").fails(1, "node b: cannot reach")


@pytest.mark.twohost
def test_bmove_of_a_stopped_vm_with_checkpoints(two, counter_image) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    joined(a, b)
    marks = vm_with_checkpoints(a.cbsd, counter_image(fill_mib=4), "c1", "c2")
    a.cbsd("bstop", "vm1", "noacpi=1").ok()
    r = a.cbsd("bmove", "jname=vm1", "node=b").ok()
    assert "moved to node b" in r.out
    moved(a, b)
    restored_from(b.cbsd, "vm1", "c1", marks["c1"])
    restored_from(b.cbsd, "vm1", "c2", marks["c2"])


@pytest.mark.twohost
def test_bmove_of_a_running_vm_resumes_it_there(two, counter_image) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    joined(a, b)
    vm_with_checkpoints(a.cbsd, counter_image(fill_mib=4), "c1")
    before = counting(a.cbsd, "vm1")
    r = a.cbsd("bmove", "jname=vm1", "node=b").ok()
    assert "running there (downtime" in r.out
    moved(a, b)
    assert b.cbsd.status("vm1") == "On"
    assert first_after(b.cbsd, "vm1", 0) >= before  # it continued, it did not boot again
    assert [c["name"] for c in b.cbsd.checkpoints("vm1")] == ["c1"]


@pytest.mark.twohost
def test_bmove_of_a_hibernated_vm(two, counter_image) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    joined(a, b)
    vm_with_checkpoints(a.cbsd, counter_image(fill_mib=4))
    before = counting(a.cbsd, "vm1")
    a.cbsd("bsuspend", "vm1").ok()
    a.cbsd("bmove", "jname=vm1", "node=b").ok()
    moved(a, b)
    assert b.cbsd.status("vm1") == "Suspended"
    b.cbsd("bstart", "vm1").ok()
    assert first_after(b.cbsd, "vm1", 0) >= before


@pytest.mark.twohost
@pytest.mark.parametrize("point", ["bmove:sent", "bmove:staged", "bmove:committed"])
def test_kill9_of_bmove_leaves_the_vm_on_exactly_one_host(two, counter_image,  # type: ignore[no-untyped-def]
                                                         point: str) -> None:
    a, b = two
    joined(a, b)
    marks = vm_with_checkpoints(a.cbsd, counter_image(fill_mib=2), "c1")
    a.cbsd("bstop", "vm1", "noacpi=1").ok()
    p = stopped_at(a.cbsd, point, "bmove", "jname=vm1", "node=b")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    if point != "bmove:committed":
        assert b.cbsd("bls", "header=0").ok().out == ""  # never registered before the commit
    r = a.cbsd("bset", "jname=vm1", "astart=0")  # the next command on it settles it
    if point == "bmove:committed":
        r.fails(1, "moved to node b")
        moved(a, b)
        restored_from(b.cbsd, "vm1", "c1", marks["c1"])
    else:
        r.ok()
        assert b.cbsd("bls", "header=0").ok().out == ""
        restored_from(a.cbsd, "vm1", "c1", marks["c1"])  # intact on a
        assert not (a.cbsd.system("vm1") / "moving").exists()
        a.cbsd("bmove", "jname=vm1", "node=b").ok()  # and it can move after all
        moved(a, b)
    assert qemu_processes(a.cbsd.workdir) == []


@pytest.mark.twohost
def test_kill9_of_the_importing_side_leaves_the_vm_on_the_source(two, counter_image) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    joined(a, b)
    marks = vm_with_checkpoints(a.cbsd, counter_image(fill_mib=8), "c1")
    a.cbsd("bstop", "vm1", "noacpi=1").ok()
    # b's cbsd stops itself once it has written the first member (fault injection on b)
    wrapper = b.root / "bin" / "cbsd"
    wrapper.write_text(wrapper.read_text().replace("exec ", "CBSD_FAILPOINT=bimport:member exec "))
    p = a.cbsd.popen("bmove", "jname=vm1", "node=b")
    victim = stopped_node_half(b"bimport\x00in=-\x00mode=stage", p)
    staging = b.cbsd.workdir / "var" / "tmp"
    # cut short mid-way: a staging folder and its lock file
    assert [(x.name[:8], x.is_dir()) for x in sorted(staging.iterdir())] == [
        ("bimport-", True), ("bimport-", False)]
    os.kill(victim, signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and err.count("\n") == 1, err
    assert b.cbsd("bls", "header=0").ok().out == ""
    restored_from(a.cbsd, "vm1", "c1", marks["c1"])
    assert not (a.cbsd.system("vm1") / "moving").exists()
    b.cbsd("bimport", "in=/dev/null").fails(2, "not a cbsd export")  # clears b's staging
    assert list(staging.iterdir()) == []


# --- live migration -----------------------------------------------------------------------

@pytest.mark.twohost
def test_bmigrate_moves_a_running_guest_without_a_restart(two, counter_image) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    joined(a, b)
    before = running_vm1(a.cbsd, counter_image(fill_mib=8))
    r = a.cbsd("bmigrate", "jname=vm1", "node=b", timeout=600).ok()
    assert "migrated to node b (downtime" in r.out, r.out
    moved(a, b)
    assert b.cbsd.status("vm1") == "On"
    # The guest went on where it was (its counter never went back) and its disk, mirrored
    # while it ran, matches its memory: every line says OK.
    assert first_after(b.cbsd, "vm1", 0) >= before
    counting(b.cbsd, "vm1", 5)
    b.cbsd("bstop", "vm1", "noacpi=1").ok()
    b.cbsd("bstart", "vm1").ok()  # and it boots there from its own disk
    counting(b.cbsd, "vm1")


@pytest.mark.twohost
def test_bmigrate_refuses_a_stopped_vm(two, counter_image) -> None:  # type: ignore[no-untyped-def]
    a, b = two
    joined(a, b)
    vm_with_checkpoints(a.cbsd, counter_image(fill_mib=1), "c1")
    a.cbsd("bstop", "vm1", "noacpi=1").ok()
    a.cbsd("bmigrate", "jname=vm1", "node=b").fails(1, "is Off")


@pytest.mark.twohost
@pytest.mark.parametrize("point", ["bmigrate:forwarded", "bmigrate:mirrored"])
def test_a_failed_bmigrate_leaves_the_guest_running_here(two, counter_image,  # type: ignore[no-untyped-def]
                                                         point: str) -> None:
    a, b = two
    joined(a, b)
    running_vm1(a.cbsd, counter_image(fill_mib=4))
    p = stopped_at(a.cbsd, point, "bmigrate", "jname=vm1", "node=b")
    # The node's half goes (as if b crashed): this side must roll back and go on.
    kill_cbsd_running(b"bmigrate\x00mode=incoming")
    os.kill(p.pid, signal.SIGCONT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and err.count("\n") == 2, err  # the failpoint's line + one
    assert a.cbsd.status("vm1") == "On"
    before = counting(a.cbsd, "vm1")
    assert counting(a.cbsd, "vm1", 3) > before
    assert b.cbsd("bls", "header=0").ok().out == ""
    deadline = time.monotonic() + 30
    while qemu_processes(b.cbsd.workdir):  # the node's QEMU ends with its half
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.mark.twohost
@pytest.mark.parametrize("side", ["here", "node"])
def test_kill9_after_the_switchover_is_settled_by_the_next_command(two, counter_image,  # type: ignore[no-untyped-def]
                                                                   side: str) -> None:
    """Killed once the memory is across, before the node has the VM: the next command here
    asks the node (which clears what it half received) and the guest runs on here."""
    a, b = two
    joined(a, b)
    before = running_vm1(a.cbsd, counter_image(fill_mib=4))
    if side == "here":
        p = stopped_at(a.cbsd, "bmigrate:migrated", "bmigrate", "jname=vm1", "node=b")
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    else:  # b's half stops itself once told "go", and is killed there
        code, _, err = node_half_killed(a, b, "bmigrate:go", b"bmigrate\x00mode=incoming",
                                        "bmigrate", "jname=vm1", "node=b")
        assert code == 1 and err.count("\n") == 1, err
    assert (a.cbsd.system("vm1") / "moving").exists()
    a.cbsd("bstart", "vm1").fails(1, "already running")  # settled first, then refused
    assert not (a.cbsd.system("vm1") / "moving").exists()
    assert a.cbsd.status("vm1") == "On"
    assert counting(a.cbsd, "vm1", 5) > before
    assert b.cbsd("bls", "header=0").ok().out == ""
    assert qemu_processes(b.cbsd.workdir) == []
    a.cbsd("bmigrate", "jname=vm1", "node=b", timeout=600).ok()  # and it can go after all
    moved(a, b)
