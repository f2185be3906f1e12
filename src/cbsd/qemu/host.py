"""What this host's QEMU is and can do: probed, never assumed (Debian 12 has 7.2, 13 has 10.x)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbsd import debug
from cbsd.errors import CbsdError, QemuError
from cbsd.storage.atomic import write_atomic

QBOOT_PATHS = ("/usr/share/qemu/qboot.rom", "/usr/share/qemu/qboot.bin")
# UEFI firmware (Debian's ovmf package, 12 and 13): code and its variable-store template,
# the 4 MiB build first. Secure-boot builds are left out: they need SMM and q35.
OVMF_PAIRS = (("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
              ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"))


@dataclass(frozen=True)
class Host:
    qemu: str
    qemu_img: str
    version: str  # "7.2.22"
    accel: str  # "kvm" or "tcg"
    qboot: str | None  # fast firmware for direct kernel boot, if installed
    machines: tuple[tuple[str, str | None], ...] = ()  # (name, alias_of)
    ovmf: tuple[tuple[str, str], ...] = ()  # (code, vars template) pairs found
    devices: frozenset[str] = frozenset()  # device models this QEMU offers (-device help)

    @property
    def agent_channel(self) -> bool:
        return {"virtio-serial-pci", "virtserialport"} <= self.devices

    def ovmf_code_for(self, vars_size: int) -> str | None:
        """The firmware whose variable store has *vars_size* bytes (a VM's store was made
        from one template; its code must be the same build)."""
        for code, template in self.ovmf:
            if os.path.getsize(template) == vars_size:
                return code
        return None


# Which binaries: CBSD_QEMU / CBSD_QEMU_IMG (a path, e.g. a private QEMU 10 on Debian 12:
# scripts/qemu10.sh), else the ones on the PATH.
OVERRIDES = {"qemu-system-x86_64": "CBSD_QEMU", "qemu-img": "CBSD_QEMU_IMG"}


def _which(name: str) -> str:
    override = os.environ.get(OVERRIDES.get(name, ""), "")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise QemuError(f"{OVERRIDES[name]}={override}: not an executable file")
        return os.path.abspath(override)
    path = shutil.which(name)
    if not path:
        raise QemuError(f"{name} not found: install QEMU "
                        "(apt-get install qemu-system-x86 qemu-utils)")
    return path


def kvm_usable(cpuinfo: str = "/proc/cpuinfo", kvm: str = "/dev/kvm") -> bool:
    """KVM only where the CPU advertises vmx/svm (nested KVM without it is slower than TCG)."""
    if os.environ.get("CBSD_ACCEL") in ("tcg", "kvm"):
        return os.environ["CBSD_ACCEL"] == "kvm"
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    if not re.search(r"\b(vmx|svm)\b", flags):
        return False
    try:
        fd = os.open(kvm, os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


@functools.cache
def qemu_img_path() -> str:
    return _which("qemu-img")


@functools.cache
def probe(cache: Path | None = None) -> Host:
    """This host's QEMU. What never changes for one binary (version, machine types) is kept
    in *cache*, keyed by the binary's path, size and mtime, so most commands run no
    subprocess; KVM usability is checked every time."""
    qemu = _which("qemu-system-x86_64")
    st = os.stat(qemu)
    key = f"{qemu}:{st.st_size}:{st.st_mtime_ns}"
    facts = _read_cache(cache, key) or _ask_qemu(qemu)
    if cache is not None and facts.get("key") != key:
        with contextlib.suppress(OSError, CbsdError):
            write_atomic(cache, json.dumps({**facts, "key": key}).encode())
    qboot = next((p for p in QBOOT_PATHS if os.path.exists(p)), None)
    ovmf = tuple((c, v) for c, v in OVMF_PAIRS if os.path.exists(c) and os.path.exists(v))
    return Host(qemu=qemu, qemu_img=qemu_img_path(), version=facts["version"],
                accel="kvm" if kvm_usable() else "tcg", qboot=qboot,
                machines=tuple((m, a) for m, a in facts["machines"]), ovmf=ovmf,
                devices=frozenset(facts["devices"]))


def _read_cache(cache: Path | None, key: str) -> dict[str, Any] | None:
    if cache is None:
        return None
    try:
        facts = json.loads(cache.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(facts, dict) or facts.get("key") != key:
        return None
    # A cache written by an older cbsd lacks what was added since: probe again.
    return facts if all(k in facts for k in ("version", "machines", "devices")) else None


def _ask_qemu(qemu: str) -> dict[str, Any]:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False).stdout
    help_text = subprocess.run([qemu, "-machine", "help"], capture_output=True, text=True,
                               check=False).stdout
    device_text = subprocess.run([qemu, "-device", "help"], capture_output=True, text=True,
                                 check=False).stdout
    if debug.ON:
        debug.log("proc", f"{qemu} --version, -machine help, -device help: probed")
    version = parse_version(out)
    if version is None:
        raise QemuError(f"cannot tell the version of {qemu}: {out.strip()[:80]!r}")
    return {"version": version, "machines": parse_machines(help_text),
            "devices": sorted(parse_devices(device_text))}


def parse_devices(text: str) -> set[str]:
    """`-device help` -> the device model names (pure; tested on recorded outputs)."""
    return set(re.findall(r'^name "([^"]+)"', text, re.MULTILINE))


def parse_version(text: str) -> str | None:
    """`qemu-system-x86_64 --version` -> '7.2.22' (pure; tested on recorded outputs)."""
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def parse_machines(text: str) -> list[tuple[str, str | None]]:
    """`-machine help` -> [(name, alias_of or None)] (pure; tested on recorded outputs)."""
    machines = []
    for line in text.splitlines()[1:]:
        name = line.split(" ", 1)[0]
        alias = re.search(r"\(alias of (\S+)\)", line)
        if name:
            machines.append((name, alias.group(1) if alias else None))
    return machines


def machine_known(host: Host, machine: str) -> bool:
    return any(name == machine for name, _ in host.machines)


def resolve_machine(host: Host, alias: str = "pc") -> str:
    """'pc' -> 'pc-i440fx-7.2': pin the versioned type, so that a QEMU upgrade keeps saved states
    loadable."""
    return next((target for name, target in host.machines if name == alias and target), alias)
