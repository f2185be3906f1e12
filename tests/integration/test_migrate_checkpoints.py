"""bmigrate of a running VM with a checkpoint tree, through the CLI between two hosts in
network namespaces (tests/guests/hosts.py, as tests/integration/test_many_hosts.py): every
checkpoint restores on the new host, and a bmigrate cut short while the checkpoints are on
their way leaves everything on the source."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.guests.hosts import joined, moved, node_half_killed, stopped_at
from tests.harness import Cbsd, qemu_processes
from tests.vmchecks import counting, first_after, leftovers, restored_from, vm_with_checkpoints

pytestmark = [pytest.mark.vm, pytest.mark.twohost]


def _tree(cbsd: Cbsd) -> list[tuple[str, str | None]]:
    return [(str(c["name"]), c["parent"]) for c in cbsd.checkpoints("vm1")]


def _snapshots(cbsd: Cbsd, tmp: Path) -> dict[str, str]:
    """Each internal snapshot of vm1's disk: its tag and the SHA-256 of its contents."""
    qemu_img = os.environ.get("CBSD_QEMU_IMG", "qemu-img")
    disk = cbsd.workdir / "vm" / "vm1" / "dsk1.qcow2"
    info = json.loads(subprocess.run([qemu_img, "info", "-U", "--output=json", str(disk)],
                                     capture_output=True, text=True, check=True).stdout)
    out = {}
    for tag in (s["name"] for s in info.get("snapshots", [])):
        raw = tmp / f"{tag}.raw"
        subprocess.run([qemu_img, "convert", "-U", "-l", f"snapshot.name={tag}", "-O", "raw",
                        str(disk), str(raw)], check=True, capture_output=True)
        out[tag] = hashlib.sha256(raw.read_bytes()).hexdigest()
        raw.unlink()
    return out


def test_bmigrate_carries_the_checkpoint_tree(two, counter_image,  # type: ignore[no-untyped-def]
                                              tmp_path: Path) -> None:
    a, b = two
    joined(a, b)
    marks = vm_with_checkpoints(a.cbsd, counter_image(fill_mib=8), "c1", "c2")
    assert _tree(a.cbsd) == [("c1", None), ("c2", "c1")]  # c2 is c1's child
    snaps = _snapshots(a.cbsd, tmp_path)
    assert len(snaps) == 2 and len(set(snaps.values())) == 2  # two different disk states
    before = counting(a.cbsd, "vm1")
    r = a.cbsd("bmigrate", "jname=vm1", "node=b", timeout=600).ok()
    assert "migrated to node b (downtime" in r.out, r.out
    moved(a, b)
    assert not a.cbsd.system("vm1").exists()  # the source keeps nothing
    assert qemu_processes(a.cbsd.workdir) == []
    assert b.cbsd.status("vm1") == "On"
    # It went on where it was, its mirrored disk matching its memory (each line says OK).
    assert first_after(b.cbsd, "vm1", 0) >= before
    counting(b.cbsd, "vm1", 3)
    assert _tree(b.cbsd) == [("c1", None), ("c2", "c1")]
    assert _snapshots(b.cbsd, tmp_path) == snaps  # each disk snapshot, byte for byte
    # The tree goes on from where the guest was: a new checkpoint is c2's child.
    b.cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c3").ok()
    assert _tree(b.cbsd)[-1] == ("c3", "c2")
    b.cbsd("bstop", "vm1", "noacpi=1").ok()
    # Each restores on the new host: memory and disk snapshot together (every line OK).
    restored_from(b.cbsd, "vm1", "c2", marks["c2"])
    restored_from(b.cbsd, "vm1", "c1", marks["c1"])
    b.cbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()


def _gone_on(cbsd: Cbsd) -> None:
    """The node's half, cut off, clears what it received (no QEMU, no files)."""
    deadline = time.monotonic() + 60
    while leftovers(cbsd) or qemu_processes(cbsd.workdir):
        assert time.monotonic() < deadline, (leftovers(cbsd), qemu_processes(cbsd.workdir))
        time.sleep(0.2)
    assert cbsd("bls", "header=0").ok().out == ""


def _intact_here(a: Cbsd, marks: dict[str, tuple[int, int]], before: int) -> None:
    assert a.status("vm1") == "On"
    assert counting(a, "vm1", 3) > before  # it ran on here
    assert _tree(a) == [("c1", None), ("c2", "c1")]
    assert not (a.system("vm1") / "moving").exists()
    a("bstop", "vm1", "noacpi=1").ok()
    # The scratch folder of the images it built: the first locked command's recovery drops it.
    assert not [p.name for p in a.system("vm1").iterdir() if "bmigrate" in p.name]
    restored_from(a, "vm1", "c1", marks["c1"])
    restored_from(a, "vm1", "c2", marks["c2"])


@pytest.mark.parametrize("point", ["bmigrate:built", "bmigrate:shipping"])
def test_kill9_while_the_checkpoints_are_shipped_leaves_all_on_the_source(  # type: ignore[no-untyped-def]
        two, counter_image, point: str) -> None:
    a, b = two
    joined(a, b)
    marks = vm_with_checkpoints(a.cbsd, counter_image(fill_mib=8), "c1", "c2")
    before = counting(a.cbsd, "vm1")
    p = stopped_at(a.cbsd, point, "bmigrate", "jname=vm1", "node=b")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    _gone_on(b.cbsd)
    _intact_here(a.cbsd, marks, before)


def test_kill9_of_the_node_while_it_receives_them_leaves_all_on_the_source(  # type: ignore[no-untyped-def]
        two, counter_image) -> None:
    a, b = two
    joined(a, b)
    marks = vm_with_checkpoints(a.cbsd, counter_image(fill_mib=8), "c1", "c2")
    before = counting(a.cbsd, "vm1")
    code, _, err = node_half_killed(a, b, "bmigrate:received", b"bmigrate\x00mode=incoming",
                                    "bmigrate", "jname=vm1", "node=b")
    assert code == 1 and err.count("\n") == 1, err
    _gone_on(b.cbsd)  # the source had the node clear it (bmigrate mode=status there)
    _intact_here(a.cbsd, marks, before)


def test_a_checkpoint_of_an_image_the_vm_no_longer_has_is_refused_naming_bmove(  # type: ignore[no-untyped-def]
        two, counter_image) -> None:
    """The one layout bmigrate cannot carry: a checkpoint holding a snapshot of an image the
    VM no longer uses (here the UEFI variable store, after vm_efi=none): QEMU mirrors only
    what it has open, so that file could not follow at the switchover."""
    a, b = two
    joined(a, b)
    image = counter_image(fill_mib=1)
    a.cbsd("bcreate", "jname=vm1", f"image={image}", "vm_os_type=other", "vm_ram=32m",
           "vm_efi=uefi").ok()
    a.cbsd("bstart", "vm1").ok()
    a.cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c1").ok()
    a.cbsd("bstop", "vm1", "noacpi=1").ok()
    a.cbsd("bset", "jname=vm1", "vm_efi=none").ok()
    a.cbsd("bstart", "vm1").ok()
    counting(a.cbsd, "vm1")
    a.cbsd("bmigrate", "jname=vm1", "node=b").fails(1, "use bmove")
    assert a.cbsd.status("vm1") == "On" and b.cbsd("bls", "header=0").ok().out == ""
    assert [c["name"] for c in a.cbsd.checkpoints("vm1")] == ["c1"]


def test_kill9_after_the_switchover_leaves_the_checkpoints_with_the_vm_here(  # type: ignore[no-untyped-def]
        two, counter_image) -> None:
    """Killed once the memory is across, before "go": the node has the VM and its checkpoints
    only under the unfinished mark; the next command here asks it (it clears them) and the
    guest runs on here with every checkpoint."""
    a, b = two
    joined(a, b)
    marks = vm_with_checkpoints(a.cbsd, counter_image(fill_mib=8), "c1", "c2")
    before = counting(a.cbsd, "vm1")
    p = stopped_at(a.cbsd, "bmigrate:migrated", "bmigrate", "jname=vm1", "node=b")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (b.cbsd.workdir / "jails-system" / "vm1" / "checkpoints").is_dir()  # it had them
    a.cbsd("bstart", "vm1").fails(1, "already running")  # settled first, then refused
    _gone_on(b.cbsd)
    _intact_here(a.cbsd, marks, before)
