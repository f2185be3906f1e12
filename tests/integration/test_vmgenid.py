"""A new VM generation for every fork of a guest's state (issue 23 part 1), shown by the guest.

Linux 5.18+ (drivers/virt/vmgenid.c) reseeds its random pool when the generation ID changes:
the first bytes a guest reads from /dev/urandom after two restores of one checkpoint differ,
and with vm_genid=off (a state saved without the device) they are equal -- so the comparison
itself can fail.

The guest: the generic Debian 12 kernel (CONFIG_VMGENID=y; the cloud flavour the Debian test
guest and test_linux.py boot has CONFIG_VIRT_DRIVERS unset, so no vmgenid driver) with a
busybox initramfs of this module's own: one vCPU, no disk, no network, nothing running but a
shell waiting on the serial port, and the crng initialised before the checkpoint (before that
a new ID is only mixed in, nothing is reseeded). Every draw moves the crng on, so the read must
be the first thing after the restore in both restores: each restore is made paused, the trigger
is queued in the UART while the guest is paused, then the guest runs -- the read is the first
thing userspace does. No periodic reseed (which mixes in interrupt timings, and made an early
version of the control fail) falls between: the guest forces one (RNDRESEEDCRNG,
tests/guests/reseed.asm) at 20 s of uptime, after which none is due for 20 s.
The guest logs "woke" to the kernel log on the trigger, before it reads: the reseed's distance
from that first step after the restore is measured.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.harness import Cbsd

pytestmark = [pytest.mark.vm]

FORK = "crng reseeded due to virtual machine fork"


def _stamp(log: str, text: str) -> float | None:
    """The kernel timestamp of the first line of *log* that holds *text*."""
    m = re.search(r"\[\s*([0-9.]+)\] [^\n]*" + re.escape(text), log)
    return float(m.group(1)) if m else None


MINI_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# A read of /dev/random waits until the crng is initialised (jitter entropy): before that the
# kernel only mixes a new generation ID in, it reseeds nothing.
head -c 1 /dev/random > /dev/null
# A reseed is also due once the seed is older than half the uptime (early boot): force one at
# 20 s, so none is due for 20 s from here -- past the checkpoint and the read.
while [ "$(cut -d. -f1 /proc/uptime)" -lt 20 ]; do sleep 1; done
/bin/reseed || echo "genid-guest: reseed failed"
echo "genid-guest: up vgid=$(ls /sys/bus/acpi/devices | grep -c QEMUVGID)"
while read -r cmd; do
    echo "genid-guest: woke" > /dev/kmsg
    head -c 16 /dev/urandom > /bytes
    echo "genid-guest: read" > /dev/kmsg
    echo "genid-guest: bytes=$(od -An -tx1 /bytes | tr -d ' \\n')"
    dmesg | grep -e 'genid-guest: woke' -e 'genid-guest: read' -e 'virtual machine fork' \\
        | tail -3 | sed 's/^/genid-log: /'
    echo "genid-guest: done"
done < /dev/ttyS0
"""


@pytest.fixture(scope="session")
def mini_guest() -> tuple[Path, Path]:
    import shutil

    from tests.guests import build

    root = build.kernel_root("")
    kernel = next(root.glob("boot/vmlinuz-*"))
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    asm = Path(build.__file__).parent / "reseed.asm"
    key = build._key(MINI_INIT.encode(), busybox, asm.read_bytes())
    initrd = build.cache_dir() / f"genid-initrd-{key}.cpio"
    if not initrd.exists():
        binary = initrd.with_suffix(".reseed")
        subprocess.run(["nasm", "-f", "bin", "-o", str(binary), str(asm)], check=True)
        dirs = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys")]
        tmp = initrd.with_suffix(".tmp")
        tmp.write_bytes(build._cpio([*dirs, ("bin/busybox", 0o100755, busybox),
                                     ("bin/reseed", 0o100755, binary.read_bytes()),
                                     ("init", 0o100755, MINI_INIT.encode())]))
        tmp.rename(initrd)
        binary.unlink()
    return kernel, initrd


def _mini(cbsd: Cbsd, guest: tuple[Path, Path], *extra: str) -> None:
    kernel, initrd = guest
    cbsd("bcreate", "jname=mg", f"kernel={kernel}", f"initrd={initrd}",
         "cmdline=console=ttyS0 quiet", "vm_ram=256m", "nic=none", *extra).ok()
    mark = cbsd.console("mg").mark()
    cbsd("bstart", "mg").ok()
    cbsd.console("mg").wait(r"genid-guest: up", since=mark, timeout=180)
    assert "reseed failed" not in cbsd.console("mg").text()
    cbsd("bcheckpoint", "mode=create", "jname=mg", "name=c").ok()


def _mini_read(cbsd: Cbsd, checkpoint: str | None = "c") -> tuple[str, str]:
    """Restore *checkpoint* (None: resume the hibernation image) paused, queue the trigger,
    let the guest run: (the bytes read, the guest's log)."""
    if checkpoint is not None and cbsd.status("mg") != "Off":
        cbsd("bstop", "mg", "noacpi=1").ok()
    con = cbsd.console("mg")
    mark = con.mark()
    cbsd("bstart", "mg", *([f"checkpoint={checkpoint}"] if checkpoint else []),
         "paused=1").ok()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(cbsd.system("mg") / "console.sock"))
        s.sendall(b"r\n")
        cbsd("bpause", "mg", "mode=off").ok()
        con.wait(r"genid-guest: done", since=mark, timeout=60)
    out = con.since(mark)
    m = re.search(r"genid-guest: bytes=([0-9a-f]{32})", out)
    assert m, out
    return m.group(1), out


@pytest.mark.linux
def test_minimal_guest_restores_differ_with_the_device(cbsd: Cbsd,
                                                       mini_guest: tuple[Path, Path]) -> None:
    _mini(cbsd, mini_guest)
    (a, log_a), (b, log_b) = _mini_read(cbsd), _mini_read(cbsd)
    assert a != b, "two restores of one checkpoint read the same random bytes"
    assert "vgid=1" in cbsd.console("mg").text(), "the guest sees the vmgenid device"
    for log in (log_a, log_b):
        reseed, woke, read = (_stamp(log, t) for t in (FORK, "genid-guest: woke",
                                                       "genid-guest: read"))
        assert reseed is not None and woke is not None and read is not None, log
        assert reseed <= read, "the guest read random bytes before it reseeded"
        print(f"minimal guest: reseed {(reseed - woke) * 1000:+.1f} ms from the first "
              f"userspace step after the restore, {(read - reseed) * 1000:.1f} ms before "
              "the read")


@pytest.mark.linux
def test_minimal_guest_restores_are_equal_without_the_device(
        cbsd: Cbsd, mini_guest: tuple[Path, Path]) -> None:
    _mini(cbsd, mini_guest, "vm_genid=off")
    assert "vgid=0" in cbsd.console("mg").text()
    (a, log_a), (b, log_b) = _mini_read(cbsd), _mini_read(cbsd)
    assert FORK not in log_a + log_b
    assert a == b, "the control failed: without vmgenid the reads should be identical"


@pytest.mark.linux
def test_resuming_its_own_hibernation_keeps_the_generation(
        cbsd: Cbsd, mini_guest: tuple[Path, Path]) -> None:
    """The same guest continuing, never run past its image: no new generation, no reseed. A
    restore of a checkpoint of the same guest, the same way, does reseed (the contrast)."""
    _mini(cbsd, mini_guest)
    cbsd("bsuspend", "mg").ok()
    _, log = _mini_read(cbsd, None)
    assert "genid-guest: bytes=" in log and FORK not in log, log
    _, log = _mini_read(cbsd, "c")
    assert FORK in log, log


@pytest.mark.linux
def test_a_state_restores_with_the_device_exactly_when_it_was_saved_with_it(
        cbsd: Cbsd, mini_guest: tuple[Path, Path]) -> None:
    """The device's state is in the stream: a state saved without it (an existing VM's, or
    vm_genid=off) restores without it after vm_genid=auto, and one saved with it restores with
    it (and a new ID) after vm_genid=off; the setting applies from the next boot."""
    _mini(cbsd, mini_guest, "vm_genid=off")
    cbsd("bstop", "mg", "noacpi=1").ok()
    cbsd("bset", "mg", "vm_genid=auto").ok()
    assert [c["restorable"] for c in cbsd.checkpoints("mg")] == [True]
    _, log = _mini_read(cbsd, "c")
    assert FORK not in log
    cbsd("bstop", "mg", "noacpi=1").ok()
    mark = cbsd.console("mg").mark()
    cbsd("bstart", "mg").ok()  # a boot: now with the device
    cbsd.console("mg").wait(r"genid-guest: up vgid=1", since=mark, timeout=180)
    cbsd("bcheckpoint", "mode=create", "jname=mg", "name=d").ok()
    cbsd("bstop", "mg", "noacpi=1").ok()
    cbsd("bset", "mg", "vm_genid=off").ok()
    assert sorted((c["name"], c["restorable"]) for c in cbsd.checkpoints("mg")) == \
        [("c", True), ("d", True)]
    _, log = _mini_read(cbsd, "d")
    assert FORK in log
