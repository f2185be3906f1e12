"""What this host's QEMU is and can do: probed, never assumed (Debian 12 has 7.2, 13 has 10.x)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from cbsd.errors import QemuError

QBOOT_PATHS = ("/usr/share/qemu/qboot.rom", "/usr/share/qemu/qboot.bin")


@dataclass(frozen=True)
class Host:
    qemu: str
    qemu_img: str
    version: str  # "7.2.22"
    accel: str  # "kvm" or "tcg"
    qboot: str | None  # fast firmware for direct kernel boot, if installed


def _which(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise QemuError(f"{name} not found: install QEMU "
                        "(apt-get install qemu-system-x86 qemu-utils)")
    return path


def kvm_usable() -> bool:
    """KVM only where the CPU advertises vmx/svm (nested KVM without it is slower than TCG)."""
    if os.environ.get("CBSD_ACCEL") in ("tcg", "kvm"):
        return os.environ["CBSD_ACCEL"] == "kvm"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    if not re.search(r"\b(vmx|svm)\b", flags):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


@functools.cache
def probe() -> Host:
    qemu = _which("qemu-system-x86_64")
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    if not m:
        raise QemuError(f"cannot tell the version of {qemu}: {out.strip()[:80]!r}")
    qboot = next((p for p in QBOOT_PATHS if os.path.exists(p)), None)
    return Host(qemu=qemu, qemu_img=_which("qemu-img"), version=m.group(1),
                accel="kvm" if kvm_usable() else "tcg", qboot=qboot)


@functools.cache
def machine_help(host: Host) -> str:
    return subprocess.run([host.qemu, "-machine", "help"], capture_output=True, text=True,
                          check=False).stdout


def machine_known(host: Host, machine: str) -> bool:
    return any(line.split(" ", 1)[0] == machine for line in machine_help(host).splitlines())


def resolve_machine(host: Host, alias: str = "pc") -> str:
    """'pc' -> 'pc-i440fx-7.2': pin the versioned type, so that a QEMU upgrade keeps saved states
    loadable."""
    out = machine_help(host)
    for line in out.splitlines():
        m = re.match(rf"{re.escape(alias)}\s+.*\(alias of (\S+)\)", line)
        if m:
            return m.group(1)
    return alias
