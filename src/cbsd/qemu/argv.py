"""QEMU's command line as a pure function of the VM spec (tested with golden files).

Restoring a saved state needs the very same device model, so checkpoint restore and hibernation
resume call this with ``incoming=True`` and otherwise identical input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cbsd.errors import UsageError
from cbsd.model import Nic, VMSpec
from cbsd.qemu.host import Host


@dataclass(frozen=True)
class RuntimePaths:
    disks: tuple[str, ...]
    qmp_sock: str
    console_sock: str
    console_log: str
    pidfile: str
    qemu_log: str
    qga_sock: str = ""
    seed: str = ""  # the cloud-init NoCloud seed (an ISO labelled cidata)
    efi_vars: str = ""  # the VM's UEFI variable store (qcow2), with vm_efi=uefi
    efi_code: str = ""  # the firmware matching that store (host.ovmf_code_for)
    taps: tuple[str, ...] = ()  # per NIC (spec.nics): the tap QEMU creates ("": a user NIC)
    ifup: str = ""  # bridge NICs: the script QEMU runs to put each tap on its bridge
    ram_file: str = ""  # guest RAM as this file (shared mapping), where it can be cloned


def _esc(value: str) -> str:
    """A value after KEY= in a QEMU option string (QemuOpts, -blockdev/-netdev's keyval):
    ',' ends it unless doubled, so every value placed there is escaped -- a value can never
    add an option, whatever it holds."""
    return value.replace(",", ",,")


def _implied(value: str, what: str) -> str:
    """A value in the first, keyless place of an option string (-machine TYPE, -vnc HOST:D):
    QEMU reads it as KEY=VALUE if it holds '='. Definitions are checked before they get here
    (cbsd/specs.py); this refuses rather than build a command line that means something else."""
    if "=" in value or "," in value or not value:
        raise UsageError(f"bad {what} {value!r}: not usable on QEMU's command line")
    return value


def hostfwd_parts(rule: str) -> tuple[str, str, str, str]:
    """'tcp:BIND:HOST:GUEST' -> its four parts. A rule stored before BIND existed
    ('tcp:HOST:GUEST') binds to 127.0.0.1, as every forward does unless asked otherwise."""
    parts = rule.split(":")
    if len(parts) == 3:
        parts.insert(1, "127.0.0.1")
    proto, bind, host, guest = parts
    return proto, bind, host, guest


RAM_ID = "pc.ram"
RAM_FILE_OPTION = b"memory-backend-file"  # how a running QEMU's argv shows a RAM file
EFI_VARS_NODE = "efi-vars"  # the UEFI variable store's block node


def disk_node(i: int) -> str:
    """The block node name of disk *i* (what checkpoints snapshot and bmigrate mirrors)."""
    return f"disk{i}"


def default_controller(spec: VMSpec) -> str:
    return "virtio-blk" if spec.os_type in ("linux", "freebsd") else "ide"


def _qcow2(file: str, node: str) -> str:
    """A qcow2 node that never opens a backing file, whatever the image's header names (JSON:
    the key=value form spells null as an empty value, which QEMU 7.2 and 10 deprecate). An
    external data file has no such switch: every launch checks the headers (img.check_header)."""
    return json.dumps({"driver": "qcow2", "file": file, "node-name": node, "backing": None},
                      separators=(",", ":"))


def _disk_device(spec: VMSpec, name: str, i: int) -> list[str]:
    """The -device of disk *i* on its controller (an AHCI controller is added once)."""
    controller = spec.disk_controllers.get(name) or default_controller(spec)
    common = f"drive={disk_node(i)},id={disk_node(i)}-dev,bootindex={i + 1}"
    if controller == "virtio-blk":
        return ["-device", f"virtio-blk-pci,{common}"]
    if controller == "nvme":
        return ["-device", f"nvme,{common},serial=cbsd-{i}"]
    if controller == "ahci":
        return ["-device", f"ide-hd,{common},bus=ahci0.{i}"]
    return ["-device", f"ide-hd,{common}"]


AS_DEFINED = "as-defined"  # build_argv's generation= for a boot: from the spec (vm_genid)
GENID_ID = "vmgenid0"  # the vmgenid device's id (QMP: /machine/peripheral/vmgenid0)
GENID_OPTION = b"vmgenid,"  # how a running QEMU's argv shows the device


def generation_arg(spec: VMSpec, generation: str | None) -> str | None:
    """The vmgenid device's guid= on this command line, or None for no device. A boot has
    it as vm_genid says, with a new ID; a load has it exactly when the saved state has it
    (the device's state is part of the stream), with the ID the load decides."""
    if generation == AS_DEFINED:
        return "auto" if spec.genid == "auto" else None
    return generation


def nic_model(spec: VMSpec) -> str:
    return "virtio-net-pci" if spec.os_type in ("linux", "freebsd") else "e1000"


def netdev_id(i: int) -> str:
    """NIC *i*'s netdev (net0 is what the one NIC of every earlier VM had)."""
    return f"net{i}"


def nic_id(i: int) -> str:
    """NIC *i*'s card (QMP: /machine/peripheral/nic{i}); a restore that forks state replaces
    it (core/checkpoint/identity.py)."""
    return f"nic{i}"


def nic_properties(spec: VMSpec, i: int, nic: Nic, addr: str = "") -> dict[str, str]:
    """NIC *i*'s card: its -device properties, also device_add's when a restore replaces it
    (then at the slot *addr* the replaced one had). romfile= : no PXE option ROM, the
    firmware boots faster and nothing netboots by surprise. The id does not enter the
    migration stream (a PCI device's section is named by its slot), so states saved before
    the cards had ids load."""
    props = {"driver": nic_model(spec), "id": nic_id(i), "netdev": netdev_id(i)}
    if nic.nic_hwaddr:
        props["mac"] = nic.nic_hwaddr
    if addr:
        props["addr"] = addr
    props["romfile"] = ""
    return props


def _nic_args(spec: VMSpec, paths: RuntimePaths, i: int, nic: Nic) -> list[str]:
    """NIC *i*: its backend and its card. The cards follow each other on the PCI bus in
    the definition's order, so the guest sees them in that order (eth0, eth1, ...)."""
    net = netdev_id(i)
    if nic.nic_type == "user":
        netdev = f"user,id={net}" + "".join(
            ",hostfwd={}:{}:{}-:{}".format(*map(_esc, hostfwd_parts(rule)))
            for rule in nic.hostfwd)
    else:
        tap = paths.taps[i] if i < len(paths.taps) else ""
        netdev = (f"tap,id={net},ifname={_esc(tap)},script={_esc(paths.ifup)},"
                  "downscript=no")
    props = nic_properties(spec, i, nic)
    device = ",".join([props.pop("driver"), *(f"{k}={_esc(v)}" for k, v in props.items())])
    return ["-netdev", netdev, "-device", device]


def build_argv(spec: VMSpec, host: Host, paths: RuntimePaths, *, incoming: bool = False,
               start_paused: bool = False, generation: str | None = AS_DEFINED) -> list[str]:
    """generation: the vmgenid device's guid ("auto": a new random one, a UUID: that one),
    None: no device, AS_DEFINED: as vm_genid says for a boot (see generation_arg)."""
    accel = host.accel
    machine = f"{_implied(spec.machine, 'machine type')},accel={accel}"
    if paths.efi_vars:
        machine += f",pflash0=efi-code,pflash1={EFI_VARS_NODE}"
    if paths.ram_file:
        machine += f",memory-backend={RAM_ID}"
    argv = [
        host.qemu,
        "-name", f"guest={_esc(spec.jname)},debug-threads=on",
        "-machine", machine,
        "-cpu", "host" if accel == "kvm" else "qemu64",
        "-m", f"{spec.ram >> 20}M",
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-rtc", "base=utc",
        "-msg", "timestamp=on",
    ]
    guid = generation_arg(spec, generation)
    if guid is not None:
        # QEMU writes guid= into guest memory when the guest's firmware placed the ID and
        # again at the end of every load (vmgenid's post_load), then notifies the guest over
        # ACPI; a running QEMU refuses to change it (qom-set: "after it was realized").
        argv += ["-device", f"vmgenid,id={GENID_ID},guid={_esc(guid)}"]
    if paths.ram_file:
        # The backend takes the id QEMU gives x86 RAM itself (pc.ram): the migration stream
        # names RAM by it, so states saved with and without a RAM file load into each other.
        argv += ["-object", f"memory-backend-file,id={RAM_ID},size={spec.ram >> 20}M,"
                 f"mem-path={_esc(paths.ram_file)},share=on"]
    if paths.efi_vars:
        code = paths.efi_code or host.ovmf[0][0]
        argv += [
            "-blockdev", f"driver=file,filename={_esc(code)},node-name=efi-code-file,"
            "read-only=on",
            "-blockdev", "driver=raw,file=efi-code-file,node-name=efi-code,read-only=on",
            "-blockdev", f"driver=file,filename={_esc(paths.efi_vars)},"
            f"node-name={EFI_VARS_NODE}-file",
            "-blockdev", _qcow2(f"{EFI_VARS_NODE}-file", EFI_VARS_NODE),
        ]
    if "ahci" in spec.disk_controllers.values():
        argv += ["-device", "ahci,id=ahci0"]
    for i, disk in enumerate(paths.disks):
        node = disk_node(i)
        argv += [
            "-blockdev", f"driver=file,filename={_esc(disk)},node-name={node}-file",
            "-blockdev", _qcow2(f"{node}-file", node),
        ]
        argv += _disk_device(spec, spec.disks[i] if i < len(spec.disks) else "", i)
    if spec.iso:
        argv += [
            "-blockdev", f"driver=file,filename={_esc(spec.iso)},node-name=cd0-file,read-only=on",
            "-blockdev", "driver=raw,file=cd0-file,node-name=cd0,read-only=on",
            "-device", f"ide-cd,drive=cd0,id=cd0-dev,bootindex={len(paths.disks) + 1}",
        ]
    if spec.kernel:
        # qboot cannot place the generation ID (it hangs on the ACPI linker's write-pointer
        # command): with the device, SeaBIOS boots the kernel. A state holds its firmware
        # (pc.bios), so a load gets the one its boot had -- which follows from the device too.
        if host.qboot and not paths.efi_vars and guid is None:
            argv += ["-bios", host.qboot]
        argv += ["-kernel", spec.kernel]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        if spec.cmdline:
            argv += ["-append", spec.cmdline]
    if spec.seed_attached(paths.seed):
        argv += [
            "-blockdev", f"driver=file,filename={_esc(paths.seed)},node-name=seed0-file,"
            "read-only=on",
            "-blockdev", "driver=raw,file=seed0-file,node-name=seed0,read-only=on",
            "-device", "ide-cd,drive=seed0,id=seed0-dev",
        ]
    for i, nic in enumerate(spec.nics):
        argv += _nic_args(spec, paths, i, nic)
    if spec.virtio_rnd:
        argv += ["-object", "rng-random,id=rng0,filename=/dev/urandom",
                 "-device", "virtio-rng-pci,rng=rng0"]
    if spec.guest_agent and paths.qga_sock:
        argv += [
            "-chardev", f"socket,id=qga0,path={_esc(paths.qga_sock)},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
    if spec.vnc:
        vnc = f"{_implied(spec.vnc_bind, 'VNC address')}:0,to=99"
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
