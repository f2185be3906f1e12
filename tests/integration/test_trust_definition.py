"""A definition from outside is data, not a command (issue 26, items 1 and 5), through the CLI
on real VMs and archives: a re-sealed archive whose definition names another VM's disk, a host
file as boot medium, VNC on every address or a port forward carrying QEMU options; a hostile
vm.json read by bregister; an inventory entry that no longer holds a definition, which bls
must not let hide the other VMs. Each is refused with exit 2 and one line (a damaged entry:
named on stderr, exit 1, the others listed), nothing registered and nothing else touched.

Archives are rebuilt here as anyone can: read the tar, edit the header, write it again with
cbsd's own Writer, which seals it anew (a seal is an integrity check, not a signature)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import COUNTER_RE, Cbsd

pytestmark = pytest.mark.vm


def reseal(archive: Path, out: Path, edit: Callable[[dict[str, Any]], None],
           edit_member: Callable[[str, bytes], bytes] = lambda name, data: data) -> Path:
    """*archive* with its header's definition changed by *edit* (and any member by
    *edit_member*), sealed again."""
    from cbsd.storage.archive import HEADER, SEAL, Source, Writer

    with tarfile.open(archive) as tar:
        members = [(m.name, edit_member(m.name, tar.extractfile(m).read()))  # type: ignore[union-attr]
                   for m in tar.getmembers()]
    head = json.loads(dict(members)[HEADER])
    edit(head["spec"])
    head["members"] = [[n, len(d)] for n, d in members if n not in (HEADER, SEAL)]
    with out.open("wb") as f:
        writer = Writer(f)
        writer.add_bytes(HEADER, json.dumps(head).encode())
        for name, data in members:
            if name not in (HEADER, SEAL):
                writer.add(name, Source(len(data), pieces=(data,)))
        writer.close()
    return out


def snapshots(disk: Path) -> list[str]:
    """The internal snapshots of a qcow2 image, as `qemu-img snapshot -l` lists them."""
    out = subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(disk)], capture_output=True,
                         text=True, check=True).stdout
    # "ID  TAG  VM SIZE  DATE  VM CLOCK  ICOUNT" then one line per snapshot.
    return [line.split()[1] for line in out.splitlines()[2:] if line.strip()]


def names(cbsd: Cbsd) -> list[str]:
    return sorted(str(r["jname"]) for r in cbsd.bls())


def folders(cbsd: Cbsd) -> dict[str, list[str]]:
    wd = cbsd.workdir
    return {d: sorted(p.name for p in (wd / d).iterdir()) if (wd / d).is_dir() else []
            for d in ("vm", "jails-system", "var/tmp")}


@pytest.fixture
def exported(cbsd: Cbsd, counter_image, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """vm1 (stopped, never started) exported: the archive the hostile ones are made from."""
    cbsd("bcreate", "jname=vm1", f"image={counter_image()}", "vm_os_type=other",
         "vm_ram=32m").ok()
    archive = tmp_path / "vm1.cbsd"
    cbsd("bexport", "jname=vm1", f"out={archive}").ok()
    return archive


def test_an_archive_cannot_name_another_vms_disk(cbsd: Cbsd, exported: Path,
                                                 counter_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # vm2, the victim, has a checkpoint: a snapshot inside its disk.
    cbsd("bcreate", "jname=vm2", f"image={counter_image(name='victim.raw')}",
         "vm_os_type=other", "vm_ram=32m").ok()
    cbsd("bstart", "vm2").ok()
    cbsd.console("vm2").wait(COUNTER_RE, count=2)
    cbsd("bcheckpoint", "mode=create", "jname=vm2", "name=keep", "poweroff=1").ok()
    victim = cbsd.workdir / "vm" / "vm2" / "dsk1.qcow2"
    kept = snapshots(victim)
    assert len(kept) == 1 and kept[0].startswith("cbsd-keep-")
    before = folders(cbsd)

    def aim_at_vm2(spec: dict[str, Any]) -> None:
        spec["disks"] = ["../vm2/dsk1.qcow2"]
    hostile = reseal(exported, tmp_path / "hostile.cbsd", aim_at_vm2)
    cbsd("bimport", f"in={hostile}", "jname=imp").fails(2, "disks")
    assert snapshots(victim) == kept  # the import's sweep never reached vm2's disk
    assert names(cbsd) == ["vm1", "vm2"] and folders(cbsd) == before
    cbsd("bstart", "vm2", "checkpoint=keep").ok()  # and vm2's checkpoint still restores
    assert cbsd.status("vm2") == "On"


def test_a_saved_states_copy_of_the_definition_is_checked_too(cbsd: Cbsd, counter_image,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path) -> None:
    from cbsd.storage import ckpstore
    from cbsd.storage.manifest import Manifest

    cbsd("bcreate", "jname=vm1", f"image={counter_image()}", "vm_os_type=other",
         "vm_ram=32m").ok()
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=2)
    cbsd("bcheckpoint", "mode=create", "jname=vm1", "name=c1", "poweroff=1").ok()
    archive = tmp_path / "vm1.cbsd"
    cbsd("bexport", "jname=vm1", f"out={archive}").ok()

    def hostile_manifest(name: str, data: bytes) -> bytes:
        if name != f"checkpoints/c1.ckp/{ckpstore.MANIFEST}":
            return data
        body = json.loads(data)
        body.pop("manifest_checksum")
        m = Manifest.from_json(body)
        m.spec = {**m.spec, "ram": "32m"}  # sealed anew, as anyone can
        return ckpstore.manifest_bytes(m)
    hostile = reseal(archive, tmp_path / "hostile.cbsd", lambda s: None, hostile_manifest)
    cbsd("bimport", f"in={hostile}", "jname=imp").fails(2, "checkpoint c1: bad value for ram")
    assert names(cbsd) == ["vm1"] and folders(cbsd)["var/tmp"] == []


def _boot_from_host_file(medium: str, path: Path) -> Callable[[dict[str, Any]], None]:
    def edit(spec: dict[str, Any]) -> None:
        spec[medium] = str(path)
    return edit


def _set(**values: Any) -> Callable[[dict[str, Any]], None]:
    def edit(spec: dict[str, Any]) -> None:
        spec.update(values)
    return edit


SECRET = "secret.txt"  # a host file beside the archive: never attached to a guest
HOSTILE: dict[str, tuple[Callable[[Path], Callable[[dict[str, Any]], None]], str]] = {
    "iso from the host": (lambda d: _boot_from_host_file("iso", d / SECRET), "iso="),
    "kernel from the host": (lambda d: _boot_from_host_file("kernel", d / SECRET), "kernel="),
    "vnc on every address": (lambda d: _set(vnc=True, vnc_bind="0.0.0.0"), "vnc_bind"),
    "hostfwd with options": (lambda d: _set(hostfwd=["tcp:127.0.0.1:2222:22,restrict=on"]),
                             "hostfwd"),
    "ram as a string": (lambda d: _set(ram="512m"), "ram"),
    "machine with options": (lambda d: _set(machine="pc,accel=kvm"), "machine"),
    "an unknown key": (lambda d: _set(qemu_args=["-device", "x"]), "qemu_args"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_definition_in_a_resealed_archive_is_refused(cbsd: Cbsd, exported: Path,
                                                               tmp_path: Path,
                                                               kind: str) -> None:
    (tmp_path / SECRET).write_text("host secret\n")
    make, key = HOSTILE[kind]
    hostile = reseal(exported, tmp_path / "hostile.cbsd", make(tmp_path))
    before = folders(cbsd)
    r = cbsd("bimport", f"in={hostile}", "jname=imp").fails(2, key)
    assert "nothing was imported" in r.err
    assert names(cbsd) == ["vm1"] and folders(cbsd) == before
    # The very archive, unaltered but re-sealed, imports: what is refused is the definition.
    cbsd("bimport", f"in={reseal(exported, tmp_path / 'same.cbsd', lambda s: None)}",
         "jname=imp").ok()
    assert names(cbsd) == ["imp", "vm1"]


def lose_inventory(cbsd: Cbsd) -> None:
    for p in (cbsd.workdir / "var" / "db").glob("local.sqlite*"):
        p.unlink()


@pytest.mark.parametrize(("change", "key"), [
    ({"disks": ["../vm2/dsk1.qcow2"]}, "disks"),
    ({"vnc": True, "vnc_bind": "0.0.0.0"}, "vnc_bind"),
    ({"hostfwd": ["tcp:127.0.0.1:2222:22,restrict=on"]}, "hostfwd"),
    ({"ram": "512m"}, "ram"),
], ids=["disk outside", "vnc wide", "hostfwd options", "ram string"])
def test_bregister_checks_a_hostile_vm_json(cbsd: Cbsd, counter_image,  # type: ignore[no-untyped-def]
                                            change: dict[str, Any], key: str) -> None:
    for jname in ("vm1", "vm2"):
        cbsd("bcreate", f"jname={jname}", f"image={counter_image()}", "vm_os_type=other",
             "vm_ram=32m").ok()
    lose_inventory(cbsd)
    spec_file = cbsd.system("vm1") / "vm.json"
    good = spec_file.read_text()
    spec_file.write_text(json.dumps({**json.loads(good), **change}))
    cbsd("bregister", "jname=vm1").fails(2, key)
    assert cbsd("bls", "header=0").ok().out == ""  # nothing registered
    spec_file.write_text(good)  # what cbsd wrote itself registers
    cbsd("bregister", "jname=*").ok()
    assert names(cbsd) == ["vm1", "vm2"]


def damage(cbsd: Cbsd, jname: str, spec: str) -> None:
    db = sqlite3.connect(cbsd.workdir / "var" / "db" / "local.sqlite")
    with db:
        db.execute("UPDATE vm SET spec = ? WHERE jname = ?", (spec, jname))
    db.close()


@pytest.mark.parametrize("kind", ["ram as a string", "not json", "another vm's"])
def test_one_damaged_entry_never_hides_the_other_vms(cbsd: Cbsd, counter_image,  # type: ignore[no-untyped-def]
                                                     kind: str) -> None:
    for jname in ("vm1", "vm2", "vm3"):
        cbsd("bcreate", f"jname={jname}", f"image={counter_image()}", "vm_os_type=other",
             "vm_ram=32m").ok()
    cbsd("bstart", "vm3").ok()
    spec = json.loads((cbsd.system("vm2") / "vm.json").read_text())
    damage(cbsd, "vm2", {"ram as a string": json.dumps({**spec, "ram": "512m"}),
                         "not json": "{\"jname\": ",
                         "another vm's": json.dumps({**spec, "jname": "vm1"})}[kind])
    r = cbsd("bls", "format=json").fails(1, "the entry of vm2 is damaged")
    rows = {row["jname"]: row for row in json.loads(r.out)}
    assert sorted(rows) == ["vm1", "vm3"] and rows["vm3"]["status"] == "On"
    r = cbsd("bls", "header=0").fails(1, "vm2")
    assert [line.split()[0] for line in r.out.splitlines()] == ["vm1", "vm3"]
    assert json.loads(cbsd("bls", "jname=vm3", "format=json").ok().out)[0]["jname"] == "vm3"
    cbsd("bget", "jname=vm2").fails(1, "the entry of vm2 is damaged")
    # The others work as ever, also through a mask: host shutdown stops vm3 and names vm2.
    r = cbsd("bstop", "jname=*", "running_only=1", "noacpi=1").fails(1, "entry of vm2")
    assert "vm3: powered off" in r.out and cbsd.status("vm3") == "Off"
    # The repair the message names: the definition kept beside the VM's files replaces it.
    assert "damaged inventory entry replaced" in cbsd("bregister", "jname=vm2").ok().out
    assert names(cbsd) == ["vm1", "vm2", "vm3"]
    cbsd("bregister", "jname=vm2").fails(1, "already registered")


def test_what_bcreate_and_bset_accept_is_never_a_damaged_entry(cbsd: Cbsd, counter_image,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    """bcreate and bset meet the same check as a definition read back (core/specs), so an
    entry they store is never refused later: a long key list (before: bls named the VM
    damaged), a boot medium named relative to the working directory (stored absolute)."""
    keys = tmp_path / "keys.pub"  # a team's keys: more text than one key (> 4 KiB)
    keys.write_text("".join(f"ssh-ed25519 {'A' * 68}{i:04d} user{i}@example\n"
                            for i in range(60)))
    cbsd("bcreate", "jname=vm1", f"image={counter_image(fill_mib=1)}", "vm_os_type=other",
         "vm_ram=32m", "ci_user_add=ops", f"ci_user_pubkey={keys}").ok()
    (tmp_path / "cd.iso").write_bytes(b"\0" * 2048)
    p = subprocess.run([sys.executable, "-m", "cbsd", "bcreate", "jname=vm2", "iso=cd.iso",
                        "vm_ram=32m", "imgsize=1m", "vm_os_type=other"],
                       cwd=tmp_path, env=cbsd.env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=120)
    assert p.returncode == 0, p.stderr
    r = cbsd("bls", "format=json")
    assert r.code == 0 and r.err == "", r.err  # listed, not named damaged
    assert [row["jname"] for row in json.loads(r.out)] == ["vm1", "vm2"]
    assert str(tmp_path / "cd.iso") in cbsd("bget", "jname=vm2", "iso").ok().out
    cbsd("bset", "jname=vm1", "vm_cpus=2").ok()  # bset stores what is read back too
    assert cbsd("bls", "format=json").ok().err == ""
