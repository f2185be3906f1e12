"""VMs whose RAM is a file (vm_ramfile=auto on a filesystem that clones files), through the CLI:
judged by the guest's counter and disk, by QEMU's own command line, and by the space the
filesystem reports. Workdirs lie on the session's loop-mounted XFS (reflink=1)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import COUNTER_RE, Cbsd, kill_vms, proc_cmdline
from tests.vmchecks import checkpoint, restore

pytestmark = pytest.mark.vm


@pytest.fixture
def xcbsd(reflink_root: Path, tmp_path: Path) -> Iterator[Cbsd]:
    """A cbsd whose workdir can clone files (the normal `cbsd` may be on ext4)."""
    wd = reflink_root / f"rf-{tmp_path.name}" / "wd"
    yield Cbsd(wd)
    kill_vms(wd)
    shutil.rmtree(wd.parent, ignore_errors=True)


def start(cbsd: Cbsd, image: Path, *extra: str, jname: str = "vm1") -> None:
    cbsd("bcreate", f"jname={jname}", f"image={image}", "vm_os_type=other", "vm_ram=256m",
         *extra).ok()
    cbsd("bstart", jname).ok()
    cbsd.console(jname).wait(COUNTER_RE, count=3, timeout=60)


def uses_ram_file(cbsd: Cbsd, jname: str = "vm1") -> bool:
    return b"memory-backend-file" in proc_cmdline(cbsd.pid(jname))


def used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def ckdir(cbsd: Cbsd, name: str, jname: str = "vm1") -> Path:
    return cbsd.system(jname) / "checkpoints" / f"{name}.ckp"


def test_checkpoint_clones_ram_and_restores_it_twice(xcbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    start(xcbsd, counter_image(fill_mib=200))
    assert uses_ram_file(xcbsd) and (xcbsd.system("vm1") / "ram").stat().st_size == 256 << 20
    lo, hi = checkpoint(xcbsd, "vm1", "c")
    d = ckdir(xcbsd, "c")
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "memory", "ram"]
    assert (d / "memory").stat().st_size < 4 << 20, "the stream holds device state only"
    assert oct((d / "ram").stat().st_mode & 0o777) == "0o600"
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format"] == 3 and "ram" in manifest["files"]
    xcbsd("bstop", "vm1", "noacpi=1").ok()
    assert not (xcbsd.system("vm1") / "ram").exists(), "the running RAM file goes with QEMU"
    for _ in range(2):  # the checkpoint's RAM is cloned, never written: twice the same
        first = restore(xcbsd, "vm1", "c")[0]
        assert lo <= first[0] <= hi + 1 and first[2] == "OK"
        assert uses_ram_file(xcbsd)
        xcbsd("bstop", "vm1", "noacpi=1").ok()
    xcbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()


def test_five_checkpoints_share_their_unchanged_ram(xcbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    """The issue's target: 5 checkpoints of a barely changing guest take <= 1.5x the space of
    one (filesystem space used, shared blocks counted once)."""
    start(xcbsd, counter_image(fill_mib=200))
    root = xcbsd.workdir
    checkpoint(xcbsd, "vm1", "c1")
    xcbsd("bstop", "vm1", "noacpi=1").ok()  # only the checkpoint holds RAM now
    base = used(root)
    xcbsd("bstart", "vm1", "checkpoint=c1").ok()
    for i in range(2, 6):
        checkpoint(xcbsd, "vm1", f"c{i}")
    xcbsd("bstop", "vm1", "noacpi=1").ok()
    one = sum(b.stat().st_blocks for b in ckdir(xcbsd, "c1").iterdir()) * 512
    assert one > 200 << 20, "one checkpoint holds the guest's 200 MiB of random RAM"
    five = one + (used(root) - base)
    assert five <= 1.5 * one, f"5 checkpoints use {five >> 20} MiB, one {one >> 20} MiB"
    # ... and destroying one leaves the others whole and restorable.
    xcbsd("bcheckpoint", "mode=destroy", "jname=vm1", "name=c1").ok()
    xcbsd("bcheckpoint", "mode=verify", "jname=vm1").ok()
    restore(xcbsd, "vm1", "c3")


def test_stream_and_ram_file_states_load_into_each_other(xcbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    start(xcbsd, counter_image(fill_mib=50), "vm_ramfile=off")
    assert not uses_ram_file(xcbsd)
    lo, hi = checkpoint(xcbsd, "vm1", "stream")
    assert not (ckdir(xcbsd, "stream") / "ram").exists()
    xcbsd("bstop", "vm1", "noacpi=1").ok()
    xcbsd("bset", "jname=vm1", "vm_ramfile=auto").ok()
    first = restore(xcbsd, "vm1", "stream")[0]  # a full stream, loaded into a RAM file
    assert lo <= first[0] <= hi + 1 and uses_ram_file(xcbsd)
    lo, hi = checkpoint(xcbsd, "vm1", "file")
    assert (ckdir(xcbsd, "file") / "ram").exists()
    xcbsd("bstop", "vm1", "noacpi=1").ok()
    xcbsd("bset", "jname=vm1", "vm_ramfile=off").ok()
    first = restore(xcbsd, "vm1", "file")[0]  # needs its RAM file whatever the setting
    assert lo <= first[0] <= hi + 1
    xcbsd("bstop", "vm1", "noacpi=1").ok()
    xcbsd("bstart", "vm1").ok()  # a cold boot follows the setting
    assert not uses_ram_file(xcbsd)


def test_damaged_ram_file(xcbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    start(xcbsd, counter_image())
    checkpoint(xcbsd, "vm1", "c")
    xcbsd("bstop", "vm1", "noacpi=1").ok()
    ram = ckdir(xcbsd, "c") / "ram"
    with open(ram, "r+b") as f:
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0x40]))
    xcbsd("bcheckpoint", "mode=verify", "jname=vm1").fails(1, "ram checksum mismatch")
    with open(ram, "r+b") as f:
        f.truncate(1 << 20)
    xcbsd("bstart", "vm1", "checkpoint=c").fails(1, "ram has 1048576 bytes")
    assert xcbsd.status("vm1") == "Off"


def test_hibernation_and_clone_carry_the_ram_file(xcbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    start(xcbsd, counter_image(fill_mib=50))
    con = xcbsd.console("vm1")
    xcbsd("bsuspend", "vm1").ok()
    image = xcbsd.system("vm1") / "hibernate.ckp"
    assert (image / "ram").exists() and not (xcbsd.system("vm1") / "ram").exists()
    mark = con.mark()
    xcbsd("bstart", "vm1").ok()
    con.wait(COUNTER_RE, since=mark, count=2)
    assert "BOOT" not in con.since(mark) and uses_ram_file(xcbsd)
    assert not image.exists(), "the resumed image is gone"
    lo, hi = checkpoint(xcbsd, "vm1", "c")
    xcbsd("bstop", "vm1", "noacpi=1").ok()
    xcbsd("bclone", "old=vm1", "new=vm2", "checkpoint=c").ok()
    assert (ckdir(xcbsd, "c", "vm2") / "ram").exists()
    first = restore(xcbsd, "vm2", "c")[0]
    assert lo <= first[0] <= hi + 1 and uses_ram_file(xcbsd, "vm2")


def test_killed_save_publishes_nothing(xcbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    start(xcbsd, counter_image(fill_mib=50))
    checkpoint(xcbsd, "vm1", "good")
    xcbsd.at_failpoint("save:saved", "bcheckpoint", "mode=create", "jname=vm1",
                       "name=bad").kill9()
    xcbsd("bstop", "vm1", "noacpi=1").ok()  # recovery: the guest was stopped; then off
    assert [d["name"] for d in xcbsd.checkpoints("vm1")] == ["good"]
    leftovers = [p.name for p in (xcbsd.system("vm1") / "checkpoints").iterdir()]
    assert leftovers == ["good.ckp"], leftovers
    restore(xcbsd, "vm1", "good")


def test_no_ram_file_where_files_cannot_be_cloned(tmp_path: Path, counter_image) -> None:  # type: ignore[no-untyped-def]
    """On a filesystem that cannot clone (here /tmp's), RAM stays anonymous: the full stream."""
    import subprocess

    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 4096)
    cloned = subprocess.run(["cp", "--reflink=always", str(probe), str(tmp_path / "p2")],
                            capture_output=True, check=False).returncode == 0
    assert not cloned, "this test needs a workdir filesystem without reflink (ext4, tmpfs)"
    cbsd = Cbsd(tmp_path / "ext4-wd")
    try:
        start(cbsd, counter_image())
        assert not uses_ram_file(cbsd) and not (cbsd.system("vm1") / "ram").exists()
        checkpoint(cbsd, "vm1", "c")
        assert not (ckdir(cbsd, "c") / "ram").exists()
        assert (ckdir(cbsd, "c") / "memory").stat().st_size > 1 << 20, "RAM is in the stream"
    finally:
        kill_vms(cbsd.workdir)
