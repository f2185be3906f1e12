"""A VM whose RAM is a file must never be armed to die of a full filesystem (issue 26, item 3).

Guest RAM is a shared mapping of jails-system/VM/ram; after a checkpoint or restore its blocks
are shared with a clone, and each page the guest writes needs a new block: with none left the
kernel sends SIGBUS and QEMU dies. Through the CLI on a small reflink XFS of the test's own
(so this runs in every pass), made nearly full with a filler file: a checkpoint, restore or
start that could not be written back is refused with one line naming the space, and a guest
that rewrites all of its RAM keeps counting."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbsd.core.vm import ramspace
from tests.guests import build
from tests.harness import COUNTER_RE, Cbsd, proc_alive, xfs_mount

pytestmark = pytest.mark.vm

MiB = 1 << 20
RAM = 192
FILL = 128    # MiB the guest fills at boot (above its first MiB)
CHURN = 4096  # 4 KiB pages it rewrites after each line: all it filled within 8 lines
REFUSED = "no space for guest RAM in a file"


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    with xfs_mount(tmp_path / "xfs", "1G") as mnt:
        yield mnt


@pytest.fixture
def small(xfs: Path) -> Cbsd:
    """A cbsd whose workdir is on a 1 GiB reflink XFS (QEMUs end when it is unmounted)."""
    return Cbsd(xfs / "wd")


def start(cbsd: Cbsd, image: Path, jname: str = "vm1") -> None:
    cbsd("bcreate", f"jname={jname}", f"image={image}", "vm_os_type=other",
         f"vm_ram={RAM}m").ok()
    cbsd("bstart", jname).ok()
    cbsd.console(jname).wait(COUNTER_RE, count=2, timeout=60)


def free(root: Path) -> int:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


def settled_free(root: Path, deadline: float = 60) -> int:
    """Free bytes once the filesystem has finished freeing: XFS releases a deleted or shrunk
    file's blocks in the background (inode GC), and sync(2) does not always wait for that, so
    free space may still grow after it returns. Waits until two reads 0.2 s apart agree."""
    end = time.monotonic() + deadline
    os.sync()
    last = free(root)
    while True:
        time.sleep(0.2)
        os.sync()
        now = free(root)
        if now == last or time.monotonic() > end:
            return now
        last = now


def fill_to(root: Path, left: int) -> None:
    """Grow or shrink a filler file until *left* bytes (within 2 MiB) are free, once what the
    filesystem frees in the background is counted; rounds again until it holds."""
    filler = root / "filler"
    deadline = time.monotonic() + 60
    while True:
        have = settled_free(root)
        if left - 2 * MiB <= have <= left + 2 * MiB:
            return
        assert time.monotonic() < deadline, (have, left)
        fd = os.open(filler, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if have > left:
                os.posix_fallocate(fd, size, have - left)
            else:
                os.ftruncate(fd, max(0, size - (left - have)))
        finally:
            os.close(fd)


def unfill(root: Path) -> None:
    """Remove the filler, and wait until the space it held is free again."""
    (root / "filler").unlink()
    settled_free(root)


def keeps_counting(cbsd: Cbsd, lines: int = 12, jname: str = "vm1") -> None:
    """The guest prints *lines* more lines, so it rewrote all it filled (8 lines do), and
    QEMU is still there."""
    con = cbsd.console(jname)
    con.wait(COUNTER_RE, since=con.mark(), count=lines, timeout=120)
    assert proc_alive(cbsd.pid(jname))


def churning(tmp_path: Path) -> Path:
    return build.counter_image(tmp_path / "churn.raw", fill_mib=FILL, churn_pages=CHURN)


def test_a_checkpoint_is_refused_while_the_guest_could_not_rewrite_its_ram(
        small: Cbsd, xfs: Path, tmp_path: Path) -> None:
    start(small, churning(tmp_path))
    fill_to(xfs, 48 * MiB)
    r = small("bcheckpoint", "mode=create", "jname=vm1", "name=c1").fails(1, REFUSED)
    assert "MiB free in" in r.err and f"{xfs / 'wd'}" in r.err
    keeps_counting(small)
    assert small.checkpoints("vm1") == []
    # With the space the rule asks for and not a MiB more, the same checkpoint is made, and
    # the guest survives rewriting all it filled.
    # (8 MiB over it: fill_to lands within 2 MiB, and the checkpoint's own files take some)
    fill_to(xfs, ramspace.required({}, RAM * MiB + ramspace.STREAM) + 8 * MiB)
    small("bcheckpoint", "mode=create", "jname=vm1", "name=c1").ok()
    keeps_counting(small)


def test_restore_and_start_are_refused_while_the_space_is_missing(
        small: Cbsd, xfs: Path, tmp_path: Path) -> None:
    start(small, churning(tmp_path))
    small("bcheckpoint", "mode=create", "jname=vm1", "name=c1").ok()
    small("bstop", "vm1", "noacpi=1").ok()
    fill_to(xfs, 96 * MiB)
    small("bstart", "jname=vm1", "checkpoint=c1").fails(1, REFUSED)
    assert small.status("vm1") == "Off"
    small("bstart", "vm1").fails(1, REFUSED)
    assert small.status("vm1") == "Off"
    assert not (small.system("vm1") / "ram").exists(), "a refused start leaves no RAM file"
    unfill(xfs)
    small("bstart", "jname=vm1", "checkpoint=c1").ok()
    keeps_counting(small)


def test_a_restore_whose_launch_fails_leaves_no_ram_clone(
        small: Cbsd, xfs: Path, tmp_path: Path) -> None:
    """The restore's RAM clone is placed before QEMU starts: a launch refused after that (here
    by the image check: the disk's header was made to name a host file) leaves the VM Off and
    no clone of its RAM behind."""
    start(small, churning(tmp_path))
    small("bcheckpoint", "mode=create", "jname=vm1", "name=c1").ok()
    small("bstop", "vm1", "noacpi=1").ok()
    disk = small.workdir / "vm" / "vm1" / "dsk1.qcow2"
    host = tmp_path / "host-file"
    host.write_bytes(b"\0" * MiB)
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(host), "-F", "raw", str(disk)],
                   check=True)
    small("bstart", "jname=vm1", "checkpoint=c1").fails(1, "names")
    assert small.status("vm1") == "Off"
    assert not (small.system("vm1") / "ram").exists(), "a refused launch leaves no RAM clone"
    subprocess.run(["qemu-img", "rebase", "-u", "-b", "", str(disk)], check=True)
    small("bstart", "jname=vm1", "checkpoint=c1").ok()  # the checkpoint is untouched
    keeps_counting(small)


def test_a_resume_is_refused_and_the_hibernation_kept(
        small: Cbsd, xfs: Path, tmp_path: Path) -> None:
    start(small, churning(tmp_path))
    small("bsuspend", "jname=vm1").ok()
    fill_to(xfs, 96 * MiB)
    small("bstart", "vm1").fails(1, REFUSED)
    assert small.status("vm1") == "Suspended"
    unfill(xfs)
    con = small.console("vm1")
    mark = con.mark()
    assert small("bstart", "vm1").ok().out.startswith("vm1: resumed from hibernation")
    keeps_counting(small)
    assert "BOOT" not in con.since(mark)


def test_the_ram_every_running_vm_may_still_need_is_counted(
        small: Cbsd, xfs: Path, counter_image) -> None:  # type: ignore[no-untyped-def]
    """vm1's RAM is all shared with its checkpoint (its guest rewrites nothing but a counter):
    it may still need 192 MiB, so a second 192 MiB VM may not take the space it needs."""
    start(small, counter_image(fill_mib=FILL))
    small("bcheckpoint", "mode=create", "jname=vm1", "name=c1").ok()
    fill_to(xfs, 300 * MiB)
    small("bcreate", "jname=vm2", f"image={counter_image(name='vm2.raw')}",
          "vm_os_type=other", f"vm_ram={RAM}m").ok()
    r = small("bstart", "vm2").fails(1, REFUSED)
    assert "running VMs vm1" in r.err
    assert small.status("vm2") == "Off" and small.status("vm1") == "On"


def test_what_a_ram_file_may_still_need_is_measured(xfs: Path) -> None:
    """On XFS: nothing for a file allocated whole, all it had written once cloned (XFS
    shares no unwritten extent), less what was rewritten since (FIEMAP's shared flag),
    nothing once the clone is gone."""
    from cbsd.storage import reflink

    ram = xfs / "ram"
    fd = os.open(ram, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 16 * MiB)
        assert ramspace.still_needed(ram) == 0
        os.pwrite(fd, b"r" * 8 * MiB, 0)
        os.fsync(fd)
        reflink.clone(ram, xfs / "clone")
        assert ramspace.still_needed(ram) == 8 * MiB
        os.pwrite(fd, b"x" * MiB, 2 * MiB)
        os.fsync(fd)
        assert ramspace.still_needed(ram) == 7 * MiB
    finally:
        os.close(fd)
    (xfs / "clone").unlink()
    # The clone's extents stop being shared once XFS has inactivated it (in the background).
    deadline = time.monotonic() + 60
    while ramspace.still_needed(ram) != 0:
        assert time.monotonic() < deadline, ramspace.still_needed(ram)
        os.sync()
        time.sleep(0.1)
