"""bset, bget, bclone, brename, bhyve-dsk and bls order= through the CLI on real VMs,
including their refusals and a kill -9 in the middle of each one that writes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import COUNTER_RE, TICK_RE, Cbsd, counter_lines, create_linux, qemu_processes
from tests.vmchecks import assert_guest_fine, hidden_leftovers, restore_is_sound

pytestmark = pytest.mark.vm


def qemu_io(disk: Path, command: str) -> str:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(disk)],
                          capture_output=True, text=True, check=True).stdout


# --- bset / bget --------------------------------------------------------------------------------

def test_bset_changes_what_the_guest_gets_and_marks_old_checkpoints(cbsd: Cbsd,
                                                                    linux_guest) -> None:  # type: ignore[no-untyped-def]
    create_linux(cbsd, linux_guest, "lx")
    cbsd("bstart", "lx").ok()
    con = cbsd.console("lx")
    con.wait(TICK_RE, count=2, timeout=90)
    cbsd("bcheckpoint", "mode=create", "jname=lx", "name=c").ok()
    cbsd("bset", "lx", "vm_cpus=2").fails(1, "lx: is running: stop it first (cbsd bstop)")
    assert cbsd("bget", "lx", "vm_cpus").ok().out.strip() == "1", "nothing changed"
    cbsd("bstop", "lx", "noacpi=1").ok()
    r = cbsd("bset", "lx", "vm_cpus=2", "vm_ram=384m").ok()
    assert r.out.strip().startswith("lx: set vm_cpus=2, vm_ram=384m")
    assert "1 checkpoint(s) taken with the old settings cannot be restored" in r.out
    assert cbsd("bget", "lx", "vm_ram", "vm_cpus").ok().out.splitlines() == [
        "vm_ram: 384m", "vm_cpus: 2"]
    [ck] = cbsd.checkpoints("lx")
    assert ck["restorable"] is False and "cpus was 1, now 2" in ck["why_not"]
    cbsd("bstart", "lx", "checkpoint=c").fails(1, "is incompatible with the VM's "
                                                  "configuration now")
    mark = con.mark()
    cbsd("bstart", "lx").ok()
    m = con.wait(r"cbsd-guest: cpus=(\d+) mem_kb=(\d+)", since=mark, timeout=90)[0]
    assert int(m.group(1)) == 2 and 300 * 1024 < int(m.group(2)) <= 384 * 1024
    cbsd("bstop", "lx", "noacpi=1").ok()
    cbsd("bset", "lx", "vm_cpus=1", "vm_ram=256m").ok()
    assert cbsd.checkpoints("lx")[0]["restorable"] is True, "setting it back makes it restorable"
    mark = con.mark()
    cbsd("bstart", "lx", "checkpoint=c").ok()
    con.wait(TICK_RE, since=mark, count=2, timeout=60)
    assert "cbsd-guest: up" not in con.since(mark)


def test_bset_refuses_a_hibernated_vm_and_bad_values(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bsuspend", "vm1").ok()
    cbsd("bset", "vm1", "vm_ram=64m").fails(1, "vm1: is hibernated: resume and stop it")
    cbsd("bsuspend", "vm1", "mode=discard").ok()
    cbsd("bset", "vm1", "vm_ram=1m").fails(2, "is under 16 MiB")
    cbsd("bset", "vm1", "vnc_password=x").fails(2, "vnc_password= needs vnc=1")
    cbsd("bset", "vm1", "nic_hwaddr=01:00:00:00:00:01").fails(2, "a unicast MAC address")
    cbsd("bset", "vm1", "iso=/x").fails(2, "unknown key 'iso'")
    cbsd("bset", "vm1").fails(2, "nothing to set")
    assert cbsd("bget", "vm1", "vm_ram").ok().out.strip() == "32m"


def test_bget_text_json_and_unknown_keys(cbsd: Cbsd, counter_vm: str) -> None:
    data = json.loads(cbsd("bget", "vm1", "format=json").ok().out)
    assert data["jname"] == "vm1" and data["vm_ram"] == "32m" and data["vm_os_type"] == "other"
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", data["nic_hwaddr"])
    assert json.loads(cbsd("bget", "jname=vm1", "key=vm_cpus", "format=json").ok().out) == {
        "vm_cpus": 1}
    cbsd("bget", "vm1", "nosuch").fails(2, "bget: unknown setting 'nosuch'")
    cbsd("bget", "nosuch").fails(2, "No such VM: nosuch")


def test_cloud_init_keys_can_be_set_and_cleared(cbsd: Cbsd, counter_vm: str) -> None:
    cbsd("bset", "vm1", "ci_jname=web1", "ci_user_add=admin",
         "ci_user_pw_user=Plain-Secret-42").ok()
    assert cbsd("bget", "vm1", "ci_jname", "ci_user_pw_user").ok().out.splitlines() == [
        "ci_jname: web1", "ci_user_pw_user: (set)"]
    seed = cbsd.workdir / "vm" / "vm1" / "seed.iso"
    assert seed.is_file() and seed.stat().st_mode & 0o077 == 0
    assert b"Plain-Secret-42" not in seed.read_bytes(), "only the hash reaches the seed"
    assert b"$6$" in seed.read_bytes()
    assert b"Plain-Secret-42" not in (cbsd.workdir / "var" / "db" / "local.sqlite").read_bytes()
    cbsd("bset", "vm1", "ci_jname=").ok()
    assert cbsd("bget", "vm1", "ci_jname").ok().out.strip() == ""
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)


# --- bclone -------------------------------------------------------------------------------------

def test_bclone_makes_an_independent_copy_that_continues_a_checkpoint(
        cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    at_checkpoint = counter_lines(cbsd.console("vm1").text())[-1][0]
    cbsd("bstop", "vm1", "noacpi=1").ok()
    r = cbsd("bclone", "old=vm1", "new=vm2", "checkpoint=c").ok()
    assert r.out.strip() == "vm1: cloned to vm2 with checkpoint c"
    assert cbsd("bget", "vm2", "nic_hwaddr").ok().out != cbsd("bget", "vm1", "nic_hwaddr").ok().out
    assert [c["name"] for c in cbsd.checkpoints("vm2")] == ["c"]
    cbsd("bcheckpoint", "mode=verify", "jname=vm2").ok()
    # The original goes away entirely; the copy does not notice.
    cbsd("bremove", "vm1").ok()
    con = cbsd.console("vm2")
    mark = con.mark()
    cbsd("bstart", "vm2", "checkpoint=c").ok()
    con.wait(COUNTER_RE, since=mark, count=2)
    lines = counter_lines(con.since(mark))
    assert at_checkpoint - 2 <= lines[0][0] <= at_checkpoint + 1 and "BOOT" not in con.since(mark)
    assert all(ok == "OK" for _, _, ok in lines)
    cbsd("bclone", "old=vm2", "new=vm3").fails(1, "vm2: is On: cannot clone it")


def test_bclone_refusals(cbsd: Cbsd, counter_vm: str) -> None:
    cbsd("bclone", "old=vm1", "new=vm1").fails(1, "VM already exist: vm1")
    cbsd("bclone", "old=vm1", "new=x", "checkpoint=nosuch").fails(1, "vm1: no checkpoint nosuch")
    cbsd("bclone", "old=nosuch", "new=x").fails(2, "No such VM: nosuch")
    cbsd("bclone", "old=vm1", "new=../x").fails(2, "bad new")
    assert [v["jname"] for v in cbsd.bls()] == ["vm1"]


# --- brename ------------------------------------------------------------------------------------

def test_brename_moves_everything(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    cbsd("brename", "old=vm1", "new=web").fails(1, "vm1: is On: cannot rename it")
    cbsd("bstop", "vm1", "noacpi=1").ok()
    assert cbsd("brename", "old=vm1", "new=web").ok().out.strip() == "vm1: renamed to web"
    assert [v["jname"] for v in cbsd.bls()] == ["web"]
    assert not (cbsd.workdir / "vm" / "vm1").exists() and not cbsd.system("vm1").exists()
    assert json.loads((cbsd.system("web") / "vm.json").read_text())["jname"] == "web"
    restore_is_sound(cbsd, "web", "c")


# --- kill -9 in the middle ------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["brename:noted", "brename:recorded"])
def test_kill9_during_brename(cbsd: Cbsd, running_counter: str, point: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    cbsd("bstop", "vm1", "noacpi=1").ok()
    cbsd.at_failpoint(point, "brename", "old=vm1", "new=web").kill9()
    name = "vm1" if point == "brename:noted" else "web"
    assert [v["jname"] for v in cbsd.bls()] == [name]
    # The next locked command on it finishes (or undoes) the move first.
    cbsd("bcheckpoint", "mode=destroy", f"jname={name}", "name=zz").fails(
        1, f"{name}: no checkpoint zz")
    gone = "web" if name == "vm1" else "vm1"
    assert cbsd.system(name).is_dir() and not cbsd.system(gone).exists()
    assert (cbsd.workdir / "vm" / name / "dsk1.qcow2").is_file()
    restore_is_sound(cbsd, name, "c")
    assert not any(p.name == ".rename-to" for p in cbsd.workdir.rglob(".rename-to"))


@pytest.mark.parametrize("point", ["bset:prepared", "bset:recorded"])
def test_kill9_during_bset(cbsd: Cbsd, counter_vm: str, point: str) -> None:
    cbsd.at_failpoint(point, "bset", "vm1", "vm_ram=64m").kill9()
    expected = "32m" if point == "bset:prepared" else "64m"
    assert cbsd("bget", "vm1", "vm_ram").ok().out.strip() == expected
    cbsd("bstart", "vm1").ok()  # a locked command: vm.json follows the inventory again
    spec = json.loads((cbsd.system("vm1") / "vm.json").read_text())
    assert spec["ram"] == (32 if expected == "32m" else 64) << 20
    cbsd.console("vm1").wait(COUNTER_RE, count=2)


def test_kill9_during_bclone(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    cbsd("bstop", "vm1", "noacpi=1").ok()
    cbsd.at_failpoint("bclone:copied", "bclone", "old=vm1", "new=vm2", "checkpoint=c").kill9()
    assert [v["jname"] for v in cbsd.bls()] == ["vm1"]
    assert (cbsd.workdir / "vm" / "vm2").exists(), "the cut-short copy is there, marked"
    cbsd("bclone", "old=vm1", "new=vm2", "checkpoint=c").ok()  # cleared and done again
    cbsd("bcheckpoint", "mode=verify", "jname=vm2").ok()
    restore_is_sound(cbsd, "vm2", "c")
    restore_is_sound(cbsd, "vm1", "c")


def test_kill9_during_disk_attach(cbsd: Cbsd, counter_vm: str) -> None:
    cbsd.at_failpoint("bhyve-dsk:created", "bhyve-dsk", "mode=attach", "jname=vm1",
                      "dsk_size=16m").kill9()
    assert (cbsd.workdir / "vm" / "vm1" / "dsk2.qcow2").exists()
    names = [d["dsk_name"] for d in json.loads(cbsd("bhyve-dsk", "mode=list", "jname=vm1",
                                                    "format=json").ok().out)]
    assert names == ["dsk1"]
    cbsd("bstart", "vm1").ok()  # recovery deletes the image the attach made
    assert not (cbsd.workdir / "vm" / "vm1" / "dsk2.qcow2").exists()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)


# --- bhyve-dsk ----------------------------------------------------------------------------------

def test_checkpoints_cover_every_disk(cbsd: Cbsd, counter_vm: str) -> None:
    r = cbsd("bhyve-dsk", "mode=attach", "jname=vm1", "dsk_size=16m").ok()
    assert r.out.strip() == "vm1: dsk2 attached (16m, ahci)"
    cbsd("bhyve-dsk", "mode=attach", "jname=vm1", "dsk_size=8m",
         "dsk_controller=virtio-blk").ok()
    listed = cbsd("bhyve-dsk", "mode=list", "jname=vm1").ok().out.split()
    assert listed[3:] == ["dsk1", "1m", "ide", "dsk2", "16m", "ahci", "dsk3", "8m",
                          "virtio-blk"]
    dsk2 = cbsd.workdir / "vm" / "vm1" / "dsk2.qcow2"
    qemu_io(dsk2, "write -P 0x11 0 4k")
    cbsd("bstart", "vm1").ok()
    # With an AHCI disk, QEMU 10's SeaBIOS waits out one AHCI command timeout (~32 s, in its
    # debug log: "Timeout at ahci_command") before it boots; QEMU 7.2's boots at once.
    cbsd.console("vm1").wait(COUNTER_RE, count=2, timeout=90)
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c").ok()
    cbsd("bstop", "vm1", "noacpi=1").ok()
    qemu_io(dsk2, "write -P 0x22 0 4k")  # the second disk moves on after the checkpoint
    restore_is_sound(cbsd, "vm1", "c")
    cbsd("bstop", "vm1", "noacpi=1").ok()
    check = qemu_io(dsk2, "read -P 0x11 0 4k")
    assert "Pattern verification failed" not in check and "read 4096/4096" in check, \
        "dsk2 is back at the checkpoint's contents"
    cbsd("bhyve-dsk", "mode=detach", "jname=vm1", "dsk_name=dsk2").fails(
        1, "checkpoint(s) c hold a snapshot of dsk2")
    cbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=c").ok()
    r = cbsd("bhyve-dsk", "mode=detach", "jname=vm1", "dsk_name=dsk2").ok()
    assert "its image stays at" in r.out and dsk2.exists()
    cbsd("bhyve-dsk", "mode=attach", "jname=vm1", "dsk_name=dsk2").ok()
    mark = cbsd.console("vm1").mark()
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, since=mark, count=1, timeout=90)  # the AHCI wait
    assert_guest_fine(cbsd, "vm1")


def test_disk_refusals(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bhyve-dsk", "mode=attach", "jname=vm1", "dsk_size=8m").fails(
        1, "vm1: is On: cannot attach or detach disks of it")
    cbsd("bstop", "vm1", "noacpi=1").ok()
    cbsd("bhyve-dsk", "mode=attach", "jname=vm1").fails(2, "mode=attach needs dsk_size=")
    cbsd("bhyve-dsk", "mode=detach", "jname=vm1").fails(2, "mode=detach needs dsk_name=")
    cbsd("bhyve-dsk", "mode=detach", "jname=vm1", "dsk_name=dsk9").fails(1, "no disk dsk9")
    cbsd("bhyve-dsk", "mode=list", "jname=vm1", "dsk_size=1g").fails(
        2, "dsk_size= is not used with mode=list")
    cbsd("bhyve-dsk", "mode=attach", "jname=vm1", "dsk_size=8m", "dsk_controller=scsi").fails(
        2, "bad value for dsk_controller")
    assert qemu_processes(cbsd.workdir) == [] and hidden_leftovers(cbsd, "vm1") == []


def test_an_nvme_disk_is_attached_with_a_warning(cbsd: Cbsd, counter_vm: str) -> None:
    r = cbsd("bhyve-dsk", "mode=attach", "jname=vm1", "dsk_size=8m", "dsk_controller=nvme").ok()
    assert "cannot be checkpointed or hibernated while the disk is attached" in r.err
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)
    cbsd("bcheckpoint", "mode=create", "jname=vm1").fails(1, "non-migratable device")
    assert cbsd.checkpoints("vm1") == [] and cbsd.status("vm1") == "On"


# --- bls order= ---------------------------------------------------------------------------------

def test_bls_order(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    img = counter_image()
    for name, ram in (("b", "64m"), ("a", "32m"), ("c", "48m")):
        cbsd("bcreate", f"jname={name}", f"image={img}", "vm_os_type=other",
             f"vm_ram={ram}").ok()

    def order(o: str) -> list[object]:
        return [v["jname"] for v in json.loads(cbsd("bls", "format=json", f"order={o}").ok().out)]

    assert order("jname") == ["a", "b", "c"]
    assert order("vm_ram") == ["a", "c", "b"] and order("-vm_ram") == ["b", "c", "a"]
    cbsd("bls", "order=nosuch").fails(2, "bad value for order")
