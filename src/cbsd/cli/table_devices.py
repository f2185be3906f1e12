"""The commands on a VM's devices -- its disks (bhyve-dsk), NICs (bhyve-nic) and disk-only
snapshots (bsnapshot) -- declared as every command is (cli/table.py puts them into COMMANDS:
parsing, --help and the man page); and the jname keys every table shares."""

from __future__ import annotations

from cbsd.cli.args import Command, Key
from cbsd.model import MAX_NICS, NIC_TYPES

J_MASK = Key("jname", "mask", required=True, help="VM name or mask (* and ?); bare words too")
J_NAME = Key("jname", "name", required=True, help="VM name")

DEVICE_COMMANDS = (
    Command(
        "bhyve-dsk", "List, attach or detach a stopped VM's disks.",
        (J_NAME,
         Key("mode", "enum", None, required=True, help="action",
             choices=("list", "attach", "detach")),
         Key("dsk_size", "size", None, help="attach: size of the new disk (k/m/g/t)"),
         Key("dsk_controller", "enum", None, help="attach: controller (default virtio-blk "
             "for linux/freebsd, ahci otherwise)", choices=("virtio-blk", "ahci", "nvme")),
         Key("dsk_name", "name", None, help="attach: a name (default dsk2, dsk3, ...; an "
             "image detached earlier is attached again); detach: required"),
         Key("format", "enum", "text", help="list: output format", choices=("text", "json"))),
        "cbsd bhyve-dsk mode=attach jname=vm1 dsk_size=20g dsk_controller=nvme",
        bare="one",
        readonly_modes=("list",),
        details=("Checkpoints snapshot every disk. A disk a checkpoint holds a snapshot of "
                 "cannot be detached\n(destroy those checkpoints first); a detached disk's "
                 "image stays in the VM's folder."),
    ),
    Command(
        "bhyve-nic", "List, attach or detach a stopped VM's NICs (network cards).",
        (J_NAME,
         Key("mode", "enum", None, required=True, help="action",
             choices=("list", "attach", "detach")),
         Key("nic_type", "enum", "bridge", help="attach: bridge (a tap on nic_parent) or "
             "user (QEMU's NAT)", choices=NIC_TYPES),
         Key("nic_parent", "ifname", None, help="attach: the bridge (default auto: cbsd's "
             "own network cbsd0)"),
         Key("nic_hwaddr", "mac", None, help="attach: its MAC (default: a new "
             "52:54:00:xx:xx:xx); detach: the NIC with this MAC"),
         Key("hostfwd", "hostfwd", [], help="attach, nic_type=user: forward host ports "
             "tcp:[BIND:]HOSTPORT:GUESTPORT,..."),
         Key("nic_id", "int", None, help="detach: the NIC's number in mode=list", lo=1,
             hi=MAX_NICS),
         Key("format", "enum", "text", help="list: output format", choices=("text", "json"))),
        "cbsd bhyve-nic mode=attach jname=vm1 nic_parent=br0",
        bare="one",
        readonly_modes=("list",),
        details=("NICs are in PCI order: the guest's eth0, eth1, ... NIC 1 is also bcreate's "
                 "and bset's nic=,\ninterface=, nic_hwaddr=. A checkpoint restores while the "
                 "NICs' types are, in order, those it\nwas taken with (docs/networking.md)."),
    ),
    Command(
        "bsnapshot", "Create, list, destroy and roll back disk-only snapshots of VMs.",
        (
            J_MASK,
            Key("mode", "enum", None, required=True, help="action",
                choices=("create", "list", "destroy", "destroyall", "rollback")),
            Key("name", "name", None, help="snapshot name (create: default the time, "
                "YYYYMMDDHHMMSS, as CBSD's snapname=gettimeofday; destroy, rollback: "
                "required)"),
            Key("snapname", "name", alias_of="name"),
            Key("header", "bool", True, help="list: print the header line"),
            Key("format", "enum", "text", help="list: output format", choices=("text", "json")),
        ),
        "cbsd bsnapshot mode=create jname=vm1 name=before_upgrade",
        details=("A snapshot holds the contents of every disk of the VM (no memory): cheap, "
                 "on a VM that is Off,\nOn, Paused or hibernated. On a running VM whose guest "
                 "agent answers, the guest's filesystems\nare frozen for its instant "
                 "(application-consistent); otherwise it is crash-consistent, and the\n"
                 "command says so. rollback needs the VM Off; checkpoints and other snapshots "
                 "stay as they are\n(docs/management.md)."),
        readonly_modes=("list",),
    ),
)
