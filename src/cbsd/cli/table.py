"""Every command, its keys, defaults and an example: the single source for parsing and --help."""

from __future__ import annotations

from cbsd.cli.args import Command, Key
from cbsd.core.model import BLS_COLUMNS as COLUMNS

J_MASK = Key("jname", "mask", required=True, help="VM name or mask (* and ?); bare words too")
J_NAME = Key("jname", "name", required=True, help="VM name")
RUNNING_ONLY = Key("running_only", "bool", False, help="skip VMs that are not On or Paused "
                   "(for host shutdown scripts)")
CLOUD_INIT = (
    Key("ci_user_add", "str", None, help="cloud-init: a user to create (with sudo)"),
    Key("ci_user_pubkey", "str", None, help="cloud-init: that user's SSH public key (a "
        "path, or the key itself)"),
    Key("ci_user_pw_user", "str", None, help="cloud-init: that user's password (kept "
        "hashed only)"),
    Key("ci_user_pw_root", "str", None, help="cloud-init: root's password (kept hashed only)"),
    Key("ci_jname", "str", None, help="cloud-init: the guest's host name (default: jname)"),
    Key("ci_fqdn", "str", None, help="cloud-init: the guest's fully qualified name"),
    Key("ci_ip4_addr", "str", None, help="cloud-init: DHCP or ADDRESS/PREFIX for the "
        "first NIC"),
    Key("ci_gw4", "str", None, help="cloud-init: IPv4 gateway (static ci_ip4_addr)"),
    Key("ci_nameserver_address", "str", None, help="cloud-init: DNS servers, "
        "comma-separated"),
    Key("ci_nameserver_search", "str", None, help="cloud-init: DNS search domains, "
        "comma-separated"),
)
PARALLEL = Key("parallel", "int", 4, help="how many VMs to work on at once", lo=1, hi=64)

COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command(
        "bcreate", "Define a VM (and create or import its first disk).",
        (
            J_NAME,
            Key("vm_ram", "size", 512 << 20, help="RAM (k/m/g/t suffix; default 512m)"),
            Key("vm_cpus", "int", 1, help="virtual CPUs", lo=1, hi=255),
            Key("vm_os_type", "enum", "linux", help="guest OS family",
                choices=("linux", "freebsd", "windows", "other")),
            Key("imgsize", "size", None, help="size of a new empty first disk (default 10g), "
                "or grow an imported one to it"),
            Key("image", "path", None, help="import this disk image (any format qemu-img reads)"),
            Key("iso", "path", None, help="attach this CD-ROM image"),
            Key("kernel", "path", None, help="boot this Linux kernel directly"),
            Key("initrd", "path", None, help="initial ramdisk for kernel="),
            Key("cmdline", "str", None, help="kernel command line for kernel="),
            Key("vnc", "bool", False, help="VNC console on 127.0.0.1"),
            Key("vnc_password", "str", None, help="VNC password (needs vnc=1)"),
            Key("nic", "enum", "user", help="network", choices=("user", "none")),
            Key("hostfwd", "hostfwd", [], help="forward host ports: "
                "tcp:[BIND:]HOSTPORT:GUESTPORT,... (BIND defaults to 127.0.0.1)"),
            Key("astart", "bool", False, help="start at host boot (cbsd-guests unit)"),
            Key("runasap", "bool", False, help="start right after creating"),
            Key("vm_efi", "enum", "none", help="firmware: uefi (OVMF, a per-VM variable "
                "store) or none (BIOS)", choices=("none", "uefi")),
            Key("virtio_rnd", "bool", True, help="a virtio-rng device fed from the host's "
                "/dev/urandom"),
            *CLOUD_INIT,
        ),
        "cbsd bcreate jname=vm1 vm_ram=1g imgsize=20g iso=/srv/debian.iso vnc=1",
        bare="one",
    ),
    Command(
        "bstart", "Start VMs; resume hibernated ones; or restore a checkpoint.",
        (
            J_MASK,
            Key("checkpoint", "name", None, help="restore this checkpoint (memory, devices "
                "and disks) instead of booting"),
            Key("paused", "bool", False, help="leave the VM paused after start/restore"),
            Key("boot", "bool", False, help="only VMs due at host boot: hibernated ones and "
                "those created with astart=1 (others are skipped)"),
            PARALLEL,
        ),
        "cbsd bstart jname=vm1 checkpoint=before_upgrade",
    ),
    Command(
        "bstop", "Stop VMs: ACPI power button, then power off after hard_timeout.",
        (
            J_MASK,
            Key("noacpi", "bool", False, help="power off at once instead of ACPI"),
            Key("hard_timeout", "int", 30, help="seconds to wait for the ACPI shutdown", lo=0,
                hi=86400),
            RUNNING_ONLY,
            PARALLEL,
        ),
        "cbsd bstop jname='web*' hard_timeout=60",
    ),
    Command(
        "bls", "List VMs.",
        (
            Key("jname", "mask", None, help="only VMs matching this mask"),
            Key("display", "list", None, help="columns to show, comma-separated",
                choices=COLUMNS),
            Key("header", "bool", True, help="print the header line"),
            Key("format", "enum", "table", help="output format", choices=("table", "json")),
        ),
        "cbsd bls display=jname,status,vnc_port header=0",
        readonly=True,
    ),
    Command(
        "bremove", "Delete VMs with their disks, checkpoints and hibernation image.",
        (J_MASK,),
        "cbsd bremove jname=test1",
    ),
    Command(
        "bregister", "Bring back VMs whose inventory entry was lost, from their files.",
        (Key("jname", "mask", required=True, help="VM name or mask (* and ?) among the VM "
             "folders under jails-system/ that the inventory does not list"),),
        "cbsd bregister jname='*'",
        details=("Each VM's definition is kept beside its files (jails-system/VM/vm.json); "
                 "a VM made before cbsd kept one\nis registered from its newest saved state."),
    ),
    Command(
        "blogin", "Attach the terminal to a VM's serial console (Ctrl-] detaches).",
        (J_NAME,),
        "cbsd blogin jname=vm1",
        bare="one",
    ),
    Command(
        "bcheckpoint", "Create, list, destroy and verify checkpoints.",
        (
            J_MASK,
            Key("mode", "enum", None, required=True, help="action",
                choices=("create", "list", "destroy", "destroyall", "verify")),
            Key("name", "name", None, help="checkpoint name (create: default 'checkpoint'; "
                "destroy: required)"),
            Key("poweroff", "bool", False, help="create: power the VM off once the checkpoint "
                "is safely on disk"),
            Key("suspend", "bool", alias_of="poweroff"),
            Key("live", "bool", False, help="create: keep the guest running while its memory "
                "is written"),
            Key("format", "enum", "text", help="list: output format", choices=("text", "json")),
        ),
        "cbsd bcheckpoint mode=create jname=vm1 name=after_update",
        details=("A checkpoint holds memory, CPU and device state and the disk contents of one "
                 "instant.\nRestore with: cbsd bstart jname=VM checkpoint=NAME"),
        readonly_modes=("list", "verify"),
    ),
    Command(
        "bsuspend", "Hibernate VMs (state to disk, QEMU ends, RAM freed) or discard the image.",
        (
            J_MASK,
            Key("mode", "enum", "suspend", help="action", choices=("suspend", "discard")),
            RUNNING_ONLY,
            PARALLEL,
        ),
        "cbsd bsuspend jname='*'",
        details="bstart resumes a hibernated VM where it was.",
    ),
    Command(
        "bpause", "Pause (freeze vCPUs, memory stays in RAM) or resume VMs.",
        (
            J_MASK,
            Key("mode", "enum", "auto", help="on: pause, off: resume, auto: toggle",
                choices=("auto", "on", "off")),
        ),
        "cbsd bpause jname=vm1 mode=on",
    ),
)}
