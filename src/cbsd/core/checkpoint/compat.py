"""Whether this host can run a VM and load its saved states: the checks that bimport, bmigrate's
node half and a restore share (one spelling of each: QEMU versions, machine types, the CPU a
state expects)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cbsd.model import VMSpec
from cbsd.qemu.host import Host, machine_known
from cbsd.storage.paths import HIBERNATION_DIR


def version(v: str) -> tuple[int, ...]:
    """'7.2.22' -> (7, 2, 22); parts that are not numbers are left out."""
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def newer_qemu(saved_by: str, host_version: str) -> bool:
    """Whether a state saved by QEMU *saved_by* is newer (major.minor) than this host's:
    QEMU loads older states, not newer ones."""
    return version(saved_by)[:2] > version(host_version)[:2]


def cpu_signature(host: Host) -> dict[str, Any]:
    """The CPU a saved state expects: TCG emulates qemu64 anywhere; under KVM the guest sees
    the host's CPU (-cpu host), whose features the target must all have."""
    if host.accel != "kvm":
        return {"model": "qemu64"}
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"model": "host", "flags": sorted(flags)}


def host_incompatibility(host: Host, spec: VMSpec, source: dict[str, Any],
                         states: dict[str, dict[str, Any]]) -> str | None:
    """Why this host cannot run the VM or load its saved states, or None."""
    if not machine_known(host, spec.machine):
        return f"its machine type {spec.machine} is not one this QEMU {host.version} provides"
    if spec.efi == "uefi" and not host.ovmf:
        return "it boots with UEFI and this host has no OVMF firmware (apt install ovmf)"
    for prefix, s in sorted(states.items()):
        what = "the hibernation image" if prefix == HIBERNATION_DIR else \
            f"checkpoint {prefix.split('/')[-1][:-4]}"
        if s.get("accel") != host.accel:
            return f"{what} was taken under {s.get('accel')}, this host runs {host.accel}"
        if newer_qemu(str(s.get("qemu")), host.version):
            return (f"{what} was saved by QEMU {s.get('qemu')}, newer than this host's "
                    f"{host.version}")
        if not machine_known(host, str(s.get("machine"))):
            return f"{what} needs machine type {s.get('machine')}, which this QEMU lacks"
    cpu = source.get("cpu") or {}
    if states and cpu.get("model") == "host":
        lacking = set(cpu.get("flags", ())) - set(cpu_signature(host).get("flags", ()))
        if lacking:
            return (f"its saved states expect CPU features this host lacks "
                    f"({', '.join(sorted(lacking)[:5])})")
    return None
