"""QEMU's command line as a pure function of the VM spec (tested with golden files).

Restoring a saved state needs the very same device model, so checkpoint restore and hibernation
resume call this with ``incoming=True`` and otherwise identical input.
"""

from __future__ import annotations

from dataclasses import dataclass

from cbsd.core.model import VMSpec
from cbsd.qemu.host import Host


@dataclass(frozen=True)
class RuntimePaths:
    disks: tuple[str, ...]
    qmp_sock: str
    console_sock: str
    console_log: str
    pidfile: str
    qemu_log: str


def _esc(value: str) -> str:
    """QEMU option values escape ',' by doubling it."""
    return value.replace(",", ",,")


def disk_bus(spec: VMSpec) -> str:
    return "virtio-blk-pci" if spec.os_type in ("linux", "freebsd") else "ide-hd"


def nic_model(spec: VMSpec) -> str:
    return "virtio-net-pci" if spec.os_type in ("linux", "freebsd") else "e1000"


def build_argv(spec: VMSpec, host: Host, paths: RuntimePaths, *, incoming: bool = False,
               start_paused: bool = False) -> list[str]:
    accel = host.accel
    argv = [
        host.qemu,
        "-name", f"guest={spec.jname},debug-threads=on",
        "-machine", f"{spec.machine},accel={accel}",
        "-cpu", "host" if accel == "kvm" else "qemu64",
        "-m", f"{spec.ram >> 20}M",
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-rtc", "base=utc",
        "-msg", "timestamp=on",
    ]
    for i, disk in enumerate(paths.disks):
        argv += [
            "-blockdev", f"driver=file,filename={_esc(disk)},node-name=disk{i}-file",
            "-blockdev", f"driver=qcow2,file=disk{i}-file,node-name=disk{i}",
            "-device", f"{disk_bus(spec)},drive=disk{i},id=disk{i}-dev,bootindex={i + 1}",
        ]
    if spec.iso:
        argv += [
            "-blockdev", f"driver=file,filename={_esc(spec.iso)},node-name=cd0-file,read-only=on",
            "-blockdev", "driver=raw,file=cd0-file,node-name=cd0,read-only=on",
            "-device", f"ide-cd,drive=cd0,id=cd0-dev,bootindex={len(paths.disks) + 1}",
        ]
    if spec.kernel:
        if host.qboot:
            argv += ["-bios", host.qboot]
        argv += ["-kernel", spec.kernel]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        if spec.cmdline:
            argv += ["-append", spec.cmdline]
    if spec.nic == "user":
        netdev = "user,id=net0" + "".join(
            f",hostfwd={rule.split(':')[0]}::{rule.split(':')[1]}-:{rule.split(':')[2]}"
            for rule in spec.hostfwd
        )
        # romfile= : no PXE option ROM, the firmware boots faster and nothing netboots by surprise.
        argv += ["-netdev", netdev, "-device", f"{nic_model(spec)},netdev=net0,romfile="]
    if spec.vnc:
        vnc = f"{spec.vnc_bind}:0,to=99"
        if spec.vnc_password:
            vnc += ",password=on"  # the password itself goes over QMP, never on argv
        argv += ["-device", "VGA", "-vnc", vnc]
    argv += [
        "-chardev", (f"socket,id=serial0,path={_esc(paths.console_sock)},server=on,wait=off,"
                     f"logfile={_esc(paths.console_log)},logappend=on"),
        "-serial", "chardev:serial0",
        "-chardev", f"socket,id=qmp,path={_esc(paths.qmp_sock)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", paths.pidfile,
        "-D", paths.qemu_log,
        "-daemonize",
    ]
    if incoming:
        argv += ["-incoming", "defer"]
    if incoming or start_paused:
        argv += ["-S"]
    return argv
