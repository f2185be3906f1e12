"""bcreate / bstart / bstop / bls / bremove through the CLI against real QEMU guests."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from tests.harness import COUNTER_RE, Cbsd, counter_lines, proc_alive, proc_cmdline

pytestmark = pytest.mark.vm


def test_start_shows_guest_output_and_bls_reports_it(cbsd: Cbsd, counter_vm: str) -> None:
    assert cbsd.status("vm1") == "Off"
    r = cbsd("bstart", "jname=vm1").ok()
    assert r.out.strip() == "vm1: started"
    lines = counter_lines(cbsd.console("vm1").wait(COUNTER_RE, count=3) and
                          cbsd.console("vm1").text())
    assert [n for n, _, _ in lines[:3]] == [1, 2, 3]
    assert all(ok == "OK" for _, _, ok in lines)
    row = cbsd.bls("vm1")[0]
    assert row["status"] == "On"
    assert row["vm_ram"] == 32 and row["vm_cpus"] == 1 and row["vm_os_type"] == "other"
    assert row["ip4_addr"] == "DHCP"
    assert row["vnc_port"] == "0"
    pid = row["jid"]
    assert isinstance(pid, int) and pid > 0
    assert str(cbsd.workdir).encode() in proc_cmdline(pid)  # type: ignore[arg-type]
    assert 0 < row["vm_curmem"] < 200  # type: ignore[operator]


def test_bls_table_display_and_header(cbsd: Cbsd, counter_vm: str) -> None:
    out = cbsd("bls").ok().out.splitlines()
    assert out[0].split() == ["JNAME", "JID", "VM_RAM", "VM_CURMEM", "VM_CPUS", "PCPU",
                              "VM_OS_TYPE", "IP4_ADDR", "STATUS", "VNC_PORT"]
    assert out[1].split() == ["vm1", "0", "32", "0", "1", "0.0", "other", "DHCP", "Off", "0"]
    assert cbsd("bls", "display=jname,status", "header=0").ok().out == "vm1  Off\n"
    data = json.loads(cbsd("bls", "format=json", "display=jname,vm_ram").ok().out)
    assert data == [{"jname": "vm1", "vm_ram": 32}]


def test_stop_noacpi_and_hard_timeout_fallback(cbsd: Cbsd, running_counter: str) -> None:
    # The boot-sector guest ignores the power button: ACPI must fall back to power-off.
    pid = cbsd.pid("vm1")
    t = time.monotonic()
    r = cbsd("bstop", "jname=vm1", "hard_timeout=1").ok()
    assert "did not shut down within 1 s: powered off" in r.out
    assert time.monotonic() - t < 15
    assert cbsd.status("vm1") == "Off"
    assert not proc_alive(pid)  # type: ignore[arg-type]
    cbsd("bstart", "vm1").ok()
    assert cbsd("bstop", "jname=vm1", "noacpi=1").ok().out.strip() == "vm1: powered off"
    assert cbsd.status("vm1") == "Off"


def test_console_log_is_appended_across_starts(cbsd: Cbsd, counter_vm: str) -> None:
    con = cbsd.console("vm1")
    for _ in range(2):
        cbsd("bstart", "vm1").ok()
        mark = con.mark()
        con.wait(COUNTER_RE, since=mark, count=2)
        cbsd("bstop", "vm1", "noacpi=1").ok()
    text = con.text()
    assert text.count("BOOT disk=") == 2
    # The disk kept the first run's count: the second boot read it back.
    second_boot = int(text.split("BOOT disk=")[2].split()[0])
    assert second_boot >= 2


def test_killed_qemu_shows_off_and_starts_again(cbsd: Cbsd, running_counter: str) -> None:
    os.kill(cbsd.pid("vm1"), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while cbsd.status("vm1") != "Off":
        assert time.monotonic() < deadline, "a dead QEMU must show Off"
        time.sleep(0.05)
    assert cbsd.bls("vm1")[0]["jid"] == 0
    cbsd("bstart", "vm1").ok()
    assert cbsd.status("vm1") == "On"


def test_wrong_state_errors(cbsd: Cbsd, running_counter: str) -> None:
    r = cbsd("bstart", "vm1")
    assert r.code == 1 and r.err.strip() == "vm1: already running"
    cbsd("bstop", "vm1", "noacpi=1").ok()
    r = cbsd("bstop", "vm1")
    assert r.code == 1 and r.err.strip() == "vm1: not running"
    r = cbsd("bpause", "vm1")
    assert r.code == 1 and "vm1: is Off" in r.err


def test_masks_act_on_each_and_report_each(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    img = counter_image()
    for n in ("web1", "web2", "db1"):
        cbsd("bcreate", f"jname={n}", f"image={img}", "vm_os_type=other", "vm_ram=32m").ok()
    r = cbsd("bstart", "jname=web*").ok()
    assert sorted(r.out.split("\n")[:2]) == ["web1: started", "web2: started"]
    assert {v["jname"]: v["status"] for v in cbsd.bls()} == {
        "db1": "Off", "web1": "On", "web2": "On"}
    assert [v["jname"] for v in cbsd.bls("web?")] == ["web1", "web2"]
    # One already running: the others still start, each reported, exit non-zero.
    r = cbsd("bstart", "*")
    assert r.code == 1
    assert "db1: started" in r.out
    assert "web1: already running" in r.err and "web2: already running" in r.err
    r = cbsd("bstop", "jname=nomatch*")
    assert r.code == 2 and r.err.strip() == "No VM matches the mask: nomatch*"
    r = cbsd("bls", "jname=x?")
    assert r.code == 2 and "No VM matches the mask: x?" in r.err
    cbsd("bremove", "*").ok()
    assert cbsd.bls() == []


def test_remove_deletes_everything(cbsd: Cbsd, running_counter: str) -> None:
    cbsd("bcheckpoint", "mode=create", "jname=vm1").ok()
    pid = cbsd.pid("vm1")
    assert cbsd("bremove", "vm1").ok().out.strip() == "vm1: removed"
    assert not cbsd.system("vm1").exists()
    assert not (cbsd.workdir / "vm" / "vm1").exists()
    assert cbsd.bls() == []
    assert not proc_alive(pid), "bremove returns once its QEMU is gone"
    r = cbsd("bstart", "vm1")
    assert r.code == 2 and r.err.strip() == "No such VM: vm1"


def test_runasap_and_imgsize(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    r = cbsd("bcreate", "jname=r1", f"image={counter_image()}", "vm_os_type=other",
             "vm_ram=32m", "imgsize=64m", "runasap=1").ok()
    assert r.out.splitlines() == ["r1: created", "r1: started"]
    assert cbsd.status("r1") == "On"
    cbsd.console("r1").wait(COUNTER_RE)
    cbsd("bcreate", "jname=e1", "vm_os_type=other", "vm_ram=32m", "imgsize=20m").ok()
    import subprocess
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(cbsd.workdir / "vm/e1/dsk1.qcow2")],
        capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 20 << 20 and info["format"] == "qcow2"


def _rfb_banner(port: int) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        banner = s.recv(12)
        s.sendall(b"RFB 003.008\n")
        n = s.recv(1)[0]
        return banner, s.recv(n)


def test_vnc_on_loopback_and_password(cbsd: Cbsd, counter_image) -> None:  # type: ignore[no-untyped-def]
    img = counter_image()
    cbsd("bcreate", "jname=v1", f"image={img}", "vm_os_type=other", "vm_ram=32m", "vnc=1").ok()
    cbsd("bcreate", "jname=v2", f"image={img}", "vm_os_type=other", "vm_ram=32m", "vnc=1",
         "vnc_password=s3cret").ok()
    cbsd("bstart", "v*").ok()
    ports = {}
    for name in ("v1", "v2"):
        addr = cbsd.bls(name)[0]["vnc_port"]
        host, port = str(addr).split(":")
        assert host == "127.0.0.1" and 5900 <= int(port) < 6000
        ports[name] = int(port)
        with open("/proc/net/tcp") as f:
            listening = [ln.split()[1] for ln in f.readlines()[1:]]
        assert f"0100007F:{int(port):04X}" in listening  # bound to 127.0.0.1 only
    banner, types = _rfb_banner(ports["v1"])
    assert banner.startswith(b"RFB 003.008") and 1 in types  # 1 = no authentication
    banner, types = _rfb_banner(ports["v2"])
    assert 2 in types and 1 not in types  # 2 = VNC password authentication
    for pid in (cbsd.pid("v1"), cbsd.pid("v2")):
        assert b"s3cret" not in proc_cmdline(pid)
