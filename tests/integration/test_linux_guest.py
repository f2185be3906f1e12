"""A real Linux guest: boots, talks on its console, serves through hostfwd, shuts down on the
ACPI button, and survives checkpoint/restore with its uptime and disk continuing."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time

import pytest

from tests.harness import TICK_RE, Cbsd, create_linux

pytestmark = [pytest.mark.vm, pytest.mark.linux]


def ticks(text: str) -> list[tuple[int, float, int, str]]:
    return [(int(n), float(u), int(d), ok) for n, u, d, ok in re.findall(TICK_RE, text)]


def restore_ticks(cbsd: Cbsd, jname: str, checkpoint: str) -> list[tuple[int, float, int, str]]:
    """Stop the VM, restore *checkpoint*, and return the ticks it prints (at least 3), having
    checked it did not boot."""
    con = cbsd.console(jname)
    cbsd("bstop", jname, "noacpi=1").ok()
    mark = con.mark()
    cbsd("bstart", jname, f"checkpoint={checkpoint}").ok()
    con.wait(TICK_RE, since=mark, count=3, timeout=60)
    assert "cbsd-guest: up" not in con.since(mark), "no reboot"
    return ticks(con.since(mark))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_boot_console_hostfwd_and_acpi_shutdown(cbsd: Cbsd, linux_guest) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    create_linux(cbsd, linux_guest, "lx", f"hostfwd=tcp:{port}:80")
    cbsd("bstart", "lx").ok()
    con = cbsd.console("lx")
    con.wait(r"cbsd-guest: up", timeout=90)
    con.wait(TICK_RE, count=2, timeout=60)
    assert "Linux version" in con.text() or "cbsd-guest: up" in con.text()
    body = b""
    deadline = time.monotonic() + 30
    while b"cbsd-guest-http" not in body and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
                body = b"".join(iter(lambda: s.recv(4096), b""))
        except OSError:
            time.sleep(0.5)
    assert b"cbsd-guest-http" in body, "hostfwd must reach the guest's web server"
    r = cbsd("bstop", "lx", "hard_timeout=60").ok()
    assert r.out.strip() == "lx: stopped (ACPI shutdown)"
    assert "cbsd-guest: power button, shutting down" in con.text()
    assert "reboot: Power down" in con.text()
    assert cbsd.status("lx") == "Off"


def test_cpus_ram_and_cdrom_reach_the_guest(cbsd: Cbsd, linux_guest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    iso = tmp_path / "test.iso"
    iso.write_bytes(b"CBSD-TEST-ISO-0123456789".ljust(2048 * 16, b"\0"))
    create_linux(cbsd, linux_guest, "lx", "vm_cpus=2", "vm_ram=384m", f"iso={iso}")
    cbsd("bstart", "lx").ok()
    con = cbsd.console("lx")
    m = con.wait(r"cbsd-guest: cpus=(\d+) mem_kb=(\d+)", timeout=90)[0]
    assert int(m.group(1)) == 2
    assert 300 * 1024 < int(m.group(2)) <= 384 * 1024  # the kernel keeps some for itself
    con.wait(r"cbsd-guest: cdrom=CBSD-TEST-ISO-0123456789", timeout=30)
    assert cbsd.bls("lx")[0]["vm_cpus"] == 2 and cbsd.bls("lx")[0]["vm_ram"] == 384


def test_checkpoint_restore_keeps_uptime_and_disk(cbsd: Cbsd, linux_guest) -> None:  # type: ignore[no-untyped-def]
    create_linux(cbsd, linux_guest)
    cbsd("bstart", "lx").ok()
    con = cbsd.console("lx")
    con.wait(TICK_RE, count=3, timeout=90)
    before = ticks(con.text())[-1]
    cbsd("bcheckpoint", "mode=create", "jname=lx", "name=c").ok()
    after_create = ticks(con.text())[-1]
    mark = con.mark()
    con.wait(TICK_RE, since=mark, count=6, timeout=60)  # keeps running and writing its disk
    moved_on = ticks(con.text())[-1]
    assert moved_on[0] >= after_create[0] + 5 and moved_on[2] > after_create[2]
    restored = restore_ticks(cbsd, "lx", "c")
    n, up, disk, _ok = restored[0]
    assert before[0] + 1 <= n <= after_create[0] + 1, (before, after_create, restored)
    assert before[1] < up < after_create[1] + 2.0, "uptime continues from the checkpoint"
    assert up < moved_on[1], "uptime is the checkpoint's, not the later run's"
    assert disk < moved_on[2], "the disk is back at the checkpoint's contents"
    assert all(t[3] == "OK" for t in restored), restored


def test_a_restore_says_when_the_guest_has_no_agent(cbsd: Cbsd, linux_guest) -> None:  # type: ignore[no-untyped-def]
    """The busybox guest runs no guest agent: after a restore cbsd cannot set its clock, and
    says so (and what to do) instead of staying silent."""
    create_linux(cbsd, linux_guest)
    cbsd("bstart", "lx").ok()
    con = cbsd.console("lx")
    con.wait(TICK_RE, count=2, timeout=90)
    cbsd("bcheckpoint", "mode=create", "jname=lx", "name=c").ok()
    cbsd("bstop", "lx", "noacpi=1").ok()
    r = cbsd("bstart", "lx", "checkpoint=c").ok()
    assert r.out.strip() == "lx: restored from checkpoint c"
    assert "lx: no guest agent answered when the checkpoint c was saved" in r.err
    assert "clock is about" in r.err and "qemu-guest-agent" in r.err


def test_a_uefi_guest_boots_checkpoints_and_restores(cbsd: Cbsd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """vm_efi=uefi: Debian's OVMF boots systemd-boot from an EFI CD, which boots the Linux
    guest; a checkpoint covers the disk and the VM's own UEFI variable store (qcow2), and a
    restore continues where the guest was."""
    from tests.guests.build import uefi_iso

    iso = uefi_iso(tmp_path / "uefi.iso")
    cbsd("bcreate", "jname=efi", "vm_efi=uefi", f"iso={iso}", "imgsize=16m",
         "vm_ram=256m").ok()
    varstore = cbsd.workdir / "vm" / "efi" / "efivars.qcow2"
    assert varstore.is_file() and varstore.stat().st_mode & 0o077 == 0
    cbsd("bstart", "efi").ok()
    con = cbsd.console("efi")
    con.wait(r"cbsd-guest: up", timeout=180)
    con.wait(TICK_RE, count=3, timeout=60)
    assert "EFI" in con.text() or "efi" in con.text().lower()
    before = ticks(con.text())[-1]
    cbsd("bcheckpoint", "mode=create", "jname=efi", "name=c").ok()
    snapshots = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(varstore)], capture_output=True,
        text=True, check=True).stdout).get("snapshots", [])
    assert len(snapshots) == 1, "the variable store is part of the checkpoint"
    con.wait(TICK_RE, since=con.mark(), count=4, timeout=60)
    restored = restore_ticks(cbsd, "efi", "c")
    assert before[0] + 1 <= restored[0][0] <= before[0] + 3
    assert all(t[3] == "OK" for t in restored), restored
