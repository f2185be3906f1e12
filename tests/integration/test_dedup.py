"""The chunk store (vm_dedup=auto where RAM is not a file), through the CLI: checkpoints are
folded in the background, restore from their chunks (the guest continues), share space, are
verified chunk by chunk, free what none references, and survive kill -9 of the fold."""

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

from tests.harness import COUNTER_RE, Cbsd, kill_vms, proc_alive, proc_state, qemu_processes
from tests.vmchecks import checkpoint, restore, stored, wait_folded

pytestmark = pytest.mark.vm


@pytest.fixture
def ecbsd(tmp_path: Path) -> Iterator[Cbsd]:
    """A workdir on /tmp's filesystem, which cannot clone files (so RAM is not a file)."""
    cbsd = Cbsd(tmp_path / "ext4-wd")
    yield cbsd
    kill_vms(cbsd.workdir)


def start(cbsd: Cbsd, image: Path) -> None:
    cbsd("bcreate", "jname=vm1", f"image={image}", "vm_os_type=other", "vm_ram=256m").ok()
    cbsd("bstart", "vm1").ok()
    cbsd.console("vm1").wait(COUNTER_RE, count=3, timeout=60)


def allocated(*roots: Path) -> int:
    """Filesystem space the files under *roots* occupy (blocks, not sizes)."""
    return sum(p.stat().st_blocks * 512 for r in roots for p in r.rglob("*") if p.is_file())


def store(cbsd: Cbsd) -> Path:
    return cbsd.system("vm1") / "store"


def packs(cbsd: Cbsd) -> list[Path]:
    return sorted((store(cbsd) / "packs").iterdir())


def test_five_checkpoints_cost_little_more_than_one(ecbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    start(ecbsd, counter_image(fill_mib=200))
    marks = [checkpoint(ecbsd, "vm1", f"c{i}") for i in range(1, 6)]
    wait_folded(ecbsd)
    ckdir = ecbsd.system("vm1") / "checkpoints"
    assert sorted(p.name for p in (ckdir / "c3.ckp").iterdir()) == ["manifest.json",
                                                                    "memory.recipe"]
    one = json.loads((ckdir / "c1.ckp" / "manifest.json").read_text())["stream"]["size"]
    assert one > 200 << 20
    five = allocated(ckdir, store(ecbsd))
    assert five <= 2 * one, f"5 checkpoints use {five >> 20} MiB, one stream {one >> 20} MiB"
    ecbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
    ecbsd("bstop", "vm1", "noacpi=1").ok()
    for name, (lo, hi) in (("c2", marks[1]), ("c5", marks[4]), ("c2", marks[1])):
        first = restore(ecbsd, "vm1", name)[0]
        assert lo <= first[0] <= hi + 1 and first[2] == "OK", (name, first)
        ecbsd("bstop", "vm1", "noacpi=1").ok()
    # Destroying frees what no other checkpoint references, and keeps the rest restorable.
    for name in ("c1", "c2", "c3", "c4"):
        ecbsd("bcheckpoint", "mode=destroy", "jname=vm1", f"name={name}").ok()
    assert allocated(ckdir, store(ecbsd)) <= 1.1 * one
    first = restore(ecbsd, "vm1", "c5")[0]
    assert marks[4][0] <= first[0] <= marks[4][1] + 1
    ecbsd("bcheckpoint", "mode=destroyall", "jname=vm1").ok()
    assert packs(ecbsd) == [] and allocated(store(ecbsd)) == 0


def _flip_pack(cbsd: Cbsd, where: float = 0.5) -> None:
    big = max(packs(cbsd), key=lambda p: p.stat().st_size)
    with open(big, "r+b") as f:
        f.seek(min(int(big.stat().st_size * where), big.stat().st_size - 1))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


def _flip_recipe(cbsd: Cbsd) -> None:
    recipe = cbsd.system("vm1") / "checkpoints" / "c.ckp" / "memory.recipe"
    data = bytearray(recipe.read_bytes())
    data[-7] ^= 0x01
    recipe.write_bytes(data)


STORE_DAMAGE = {
    "flipped chunk": (_flip_pack, "does not match its checksum"),
    # The stream's last chunk is the pack's last: QEMU has loaded all the rest by then.
    "flipped last chunk": (lambda c: _flip_pack(c, 1.0), "does not match its checksum"),
    "deleted pack": (lambda c: [p.unlink() for p in packs(c)], "is missing"),
    "edited recipe": (_flip_recipe, "memory.recipe checksum mismatch"),
}


@pytest.mark.parametrize("kind", sorted(STORE_DAMAGE))
def test_damaged_store_is_refused_before_restore(ecbsd: Cbsd, counter_image,  # type: ignore[no-untyped-def]
                                                 kind: str) -> None:
    import hashlib

    damage, message = STORE_DAMAGE[kind]
    start(ecbsd, counter_image(fill_mib=20))
    checkpoint(ecbsd, "vm1", "c")
    wait_folded(ecbsd)
    ecbsd("bstop", "vm1", "noacpi=1").ok()
    damage(ecbsd)
    disk = ecbsd.workdir / "vm" / "vm1" / "dsk1.qcow2"
    before = hashlib.sha256(disk.read_bytes()).digest()
    r = ecbsd("bstart", "vm1", "checkpoint=c")
    assert r.code == 1 and message in r.err and r.err.count("\n") == 1, r.err
    assert qemu_processes(ecbsd.workdir) == [] and ecbsd.status("vm1") == "Off"
    assert hashlib.sha256(disk.read_bytes()).digest() == before, "the disk was reverted"
    ecbsd("bcheckpoint", "mode=verify", "jname=vm1", "name=c").fails(1, message)


def helper_at(cbsd: Cbsd, point: str, *extra: str) -> int:
    """Create a checkpoint whose background fold stops itself at *point*; returns its pid."""
    env = {**cbsd.env, "CBSD_FAILPOINT": point}
    subprocess.run([sys.executable, "-m", "cbsd", "bcheckpoint", "mode=create", "jname=vm1",
                    *extra], env=env, check=True, capture_output=True)
    lock = cbsd.workdir / "var" / "lock" / "vm1.lock"
    deadline = time.monotonic() + 60
    while True:
        text = lock.read_text() if lock.exists() else ""
        if "fold" in text and proc_state(int(text.split()[0])) == "T":
            return int(text.split()[0])
        assert time.monotonic() < deadline, f"the fold never stopped at {point}: {text!r}"
        time.sleep(0.02)


@pytest.mark.parametrize("point", ["fold:packed", "fold:recipe", "fold:sealed"])
def test_kill9_of_the_fold_leaves_no_dangling_reference(ecbsd: Cbsd, counter_image,  # type: ignore[no-untyped-def]
                                                        point: str) -> None:
    start(ecbsd, counter_image(fill_mib=20))
    lo, hi = checkpoint(ecbsd, "vm1", "first")
    wait_folded(ecbsd)
    os.kill(helper_at(ecbsd, point, "name=second"), signal.SIGKILL)
    ecbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()  # both whole, whatever their form
    ecbsd("bstop", "vm1", "noacpi=1").ok()  # a locked command: collects what the kill left
    names = sorted(p.name for p in (store(ecbsd) / "packs").iterdir())
    assert not [n for n in names if n.startswith(".tmp-")], names
    referenced = set()
    for ck in (ecbsd.system("vm1") / "checkpoints").glob("*.ckp"):
        recipe = ck / "memory.recipe"
        if recipe.exists():
            head = recipe.read_bytes().split(b"\n", 2)[1]
            referenced |= {f"{p}.pack" for p in json.loads(head)["packs"]}
    assert set(names) == referenced, "no pack is kept that no recipe references"
    first = restore(ecbsd, "vm1", "first")[0]
    assert lo <= first[0] <= hi + 1
    ecbsd("bstop", "vm1", "noacpi=1").ok()
    restore(ecbsd, "vm1", "second")


def test_a_pack_that_does_not_read_back_keeps_the_stream(ecbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    """The fold reads its chunked copy back before it deletes the stream: a pack damaged
    after it was written (here: between the write and the read-back) leaves the checkpoint a
    whole stream, and the damaged pack is collected."""
    start(ecbsd, counter_image(fill_mib=20))
    lo, hi = checkpoint(ecbsd, "vm1", "first")
    wait_folded(ecbsd)
    old = set(packs(ecbsd))
    pid = helper_at(ecbsd, "fold:written", "name=second")
    (new,) = set(packs(ecbsd)) - old
    data = bytearray(new.read_bytes())
    data[len(data) // 2] ^= 1
    new.write_bytes(data)
    os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while proc_alive(pid):
        assert time.monotonic() < deadline, "the fold did not end"
        time.sleep(0.05)
    assert stored(ecbsd) == {"first": "chunks", "second": "stream"}
    assert (ecbsd.system("vm1") / "checkpoints" / "second.ckp" / "memory").exists()
    ecbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
    ecbsd("bstop", "vm1", "noacpi=1").ok()  # a locked command: collects the damaged pack
    assert not new.exists(), "a pack no recipe references is collected"
    second = restore(ecbsd, "vm1", "second")[0]
    assert second[2] == "OK" and second[0] > lo
    ecbsd("bstop", "vm1", "noacpi=1").ok()
    first = restore(ecbsd, "vm1", "first")[0]
    assert lo <= first[0] <= hi + 1


def test_commands_never_wait_on_a_fold(ecbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    """A fold in progress gives way: the VM is not Maintenance, a command gets it at once,
    and the checkpoint it was folding stays a whole stream, folded later."""
    start(ecbsd, counter_image(fill_mib=20))
    pid = helper_at(ecbsd, "fold:locked", "name=c")
    assert ecbsd.status("vm1") == "On"
    stop = ecbsd.popen("bstop", "vm1", "noacpi=1")
    # bstop asks the fold to give way with a file beside the VM's lock (core/vm/lock.py)
    asked = ecbsd.workdir / "var" / "lock" / "vm1.lock.yield"
    deadline = time.monotonic() + 60
    while not asked.exists():
        assert stop.poll() is None and time.monotonic() < deadline, "bstop never asked"
        time.sleep(0.02)
    os.kill(pid, signal.SIGCONT)  # it sees the request at its first chunk and gives way
    assert stop.wait(30) == 0
    assert stored(ecbsd) == {"c": "stream"}
    assert not [p for p in (store(ecbsd) / "packs").iterdir() if p.name.startswith(".tmp-")]
    restore(ecbsd, "vm1", "c")
    checkpoint(ecbsd, "vm1", "d")  # its fold folds both
    wait_folded(ecbsd)
    assert set(stored(ecbsd)) == {"c", "d"}
