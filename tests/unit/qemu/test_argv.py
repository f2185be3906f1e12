"""The QEMU command line is a pure function of the VM spec: compared with golden files.

Regenerate after an intended change with: UPDATE_GOLDEN=1 pytest tests/unit/qemu/test_argv.py
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from cbsd.model import Nic, VMSpec
from cbsd.qemu.argv import RuntimePaths, build_argv
from cbsd.qemu.host import Host
from tests.paths import GOLDEN

HOST = Host(qemu="/usr/bin/qemu-system-x86_64", qemu_img="/usr/bin/qemu-img", version="7.2.0",
            accel="tcg", qboot="/usr/share/qemu/qboot.rom")
PATHS = RuntimePaths(disks=("/w/vm/x/dsk1.qcow2",), qmp_sock="/w/js/x/qmp.sock",
                     console_sock="/w/js/x/console.sock", console_log="/w/js/x/console.log",
                     pidfile="/w/js/x/qemu.pid", qemu_log="/w/js/x/qemu.log",
                     qga_sock="/w/js/x/qga.sock", seed="/w/vm/x/seed.iso")

CASES = {
    "minimal": (VMSpec(jname="x", ram=512 << 20, machine="pc-i440fx-7.2", disks=["dsk1.qcow2"]),
                {}),
    "bootsector-other": (VMSpec(jname="x", ram=32 << 20, os_type="other", machine="pc",
                                disks=["dsk1.qcow2"], nics=[]), {}),
    "kernel-vnc-hostfwd": (VMSpec(jname="x", ram=1 << 30, cpus=2, machine="pc-i440fx-7.2",
                                  disks=["dsk1.qcow2"], kernel="/k/vmlinuz", initrd="/k/initrd",
                                  cmdline="console=ttyS0", vnc=True, vnc_password="s3cret",
                                  nics=[Nic(hostfwd=["tcp:2222:22", "udp:5353:53"])]), {}),
    "agent-rng-seed-bind": (VMSpec(jname="x", ram=1 << 30, machine="pc-i440fx-7.2",
                                   disks=["dsk1.qcow2"], guest_agent=True, virtio_rnd=True,
                                   cloud_init={"ci_user_add": "u"},
                                   nics=[Nic(hostfwd=["tcp:127.0.0.1:2222:22",
                                                      "tcp:0.0.0.0:8080:80"])]),
                            {}),
    "uefi": (VMSpec(jname="x", ram=512 << 20, machine="pc-i440fx-7.2", disks=["dsk1.qcow2"],
                    efi="uefi", kernel="/k/vmlinuz", iso="/iso/efi.iso"),
             {"paths": {"efi_vars": "/w/vm/x/efivars.qcow2",
                        "efi_code": "/usr/share/OVMF/OVMF_CODE_4M.fd"}}),
    "disks-ahci-nvme": (VMSpec(jname="x", ram=512 << 20, machine="pc-i440fx-7.2",
                               disks=["dsk1.qcow2", "dsk2.qcow2", "dsk3.qcow2"],
                               disk_controllers={"dsk2.qcow2": "ahci", "dsk3.qcow2": "nvme"},
                               nics=[Nic(nic_hwaddr="52:54:00:12:34:56")]),
                        {"paths": {"disks": ("/w/vm/x/dsk1.qcow2", "/w/vm/x/dsk2.qcow2",
                                             "/w/vm/x/dsk3.qcow2")}}),
    "bridge": (VMSpec(jname="x", ram=512 << 20, machine="pc-i440fx-7.2", disks=["dsk1.qcow2"],
                      nics=[Nic(nic_type="bridge", nic_hwaddr="52:54:00:ab:cd:ef")]),
               {"paths": {"taps": ("cbsdt0123456789",), "ifup": "/w/js/x/ifup"}}),
    "iso-windows": (VMSpec(jname="x", ram=4 << 30, os_type="windows", machine="pc-i440fx-7.2",
                           disks=["dsk1.qcow2"], iso="/iso/win,1.iso"), {}),
    "restore-incoming": (VMSpec(jname="x", ram=512 << 20, machine="pc-i440fx-7.2",
                                disks=["dsk1.qcow2"]), {"incoming": True}),
    "ram-file-incoming": (VMSpec(jname="x", ram=1 << 30, machine="pc-i440fx-7.2",
                                 disks=["dsk1.qcow2"]),
                          {"incoming": True, "paths": {"ram_file": "/w/js/x/ram"}}),
    "start-paused": (VMSpec(jname="x", ram=512 << 20, machine="pc-i440fx-7.2",
                            disks=["dsk1.qcow2"]), {"paused": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_argv_matches_golden(case: str) -> None:
    spec, kw = CASES[case]
    paths = dataclasses.replace(PATHS, **kw.get("paths", {}))  # type: ignore[arg-type]
    argv = build_argv(spec, HOST, paths, incoming=kw.get("incoming", False),
                      start_paused=kw.get("paused", False))
    text = "\n".join(argv) + "\n"
    golden = GOLDEN / f"{case}.argv"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_password_never_on_the_command_line() -> None:
    spec, _ = CASES["kernel-vnc-hostfwd"]
    assert not any("s3cret" in a for a in build_argv(spec, HOST, PATHS))


def test_vnc_binds_loopback_by_default() -> None:
    spec, _ = CASES["kernel-vnc-hostfwd"]
    argv = build_argv(spec, HOST, PATHS)
    assert argv[argv.index("-vnc") + 1].startswith("127.0.0.1:")


def test_incoming_is_otherwise_identical() -> None:
    """A saved state loads only into the same device model."""
    spec, _ = CASES["minimal"]
    normal = build_argv(spec, HOST, PATHS)
    incoming = build_argv(spec, HOST, PATHS, incoming=True)
    assert incoming[:len(normal)] == normal
    assert incoming[len(normal):] == ["-incoming", "defer", "-S"]


def test_commas_in_paths_are_escaped() -> None:
    spec, _ = CASES["iso-windows"]
    assert any("filename=/iso/win,,1.iso" in a for a in build_argv(spec, HOST, PATHS))


def test_forwards_bind_loopback_unless_asked() -> None:
    """A rule stored before BIND existed ('tcp:H:G') listens on 127.0.0.1 too."""
    spec, _ = CASES["kernel-vnc-hostfwd"]
    netdev = (a := build_argv(spec, HOST, PATHS))[a.index("-netdev") + 1]
    assert netdev == "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp:127.0.0.1:5353-:53"
    spec, _ = CASES["agent-rng-seed-bind"]
    netdev = (a := build_argv(spec, HOST, PATHS))[a.index("-netdev") + 1]
    assert netdev.endswith("hostfwd=tcp:0.0.0.0:8080-:80")


def test_devices_added_later_keep_old_states_restorable() -> None:
    """A VM without the agent, rng, UEFI or a seed compares equal to a state saved before
    those settings existed; one with them does not."""
    old_state = {"ram": 1, "cpus": 1, "machine": "m", "disks": [], "iso": False,
                 "kernel": False, "vnc": False, "nic": "user"}
    plain = VMSpec(jname="x", ram=1, machine="m")
    assert plain.restore_relevant() == old_state
    full = VMSpec(jname="x", ram=1, machine="m", guest_agent=True, virtio_rnd=True,
                  efi="uefi", cloud_init={"ci_user_add": "u"})
    assert full.restore_relevant() == {**old_state, "guest_agent": True, "virtio_rnd": True,
                                       "efi": "uefi", "seed": True}


def test_uefi_uses_pflash_and_never_qboot() -> None:
    spec, kw = CASES["uefi"]
    argv = build_argv(spec, HOST, dataclasses.replace(PATHS, **kw["paths"]))  # type: ignore[arg-type]
    assert argv[argv.index("-machine") + 1].endswith(",pflash0=efi-code,pflash1=efi-vars")
    assert "-bios" not in argv, "qboot is BIOS firmware: not with UEFI"
    assert any("OVMF_CODE_4M.fd" in a and "read-only=on" in a for a in argv)
