"""Every command, its keys, defaults and an example: the single source for parsing and --help."""

from __future__ import annotations

import dataclasses

from cbsd.cli.args import Command, Key
from cbsd.cli.table_cluster import CLUSTER_COMMANDS, HA
from cbsd.cli.table_devices import DEVICE_COMMANDS, J_MASK, J_NAME
from cbsd.cli.table_schedule import SCHEDULE, SCHEDULE_COMMANDS
from cbsd.cli.table_service import SERVICE_COMMANDS
from cbsd.model import AUTO_OFF, EFI_MODES, MAX_CPUS, NICS, OS_TYPES
from cbsd.model import BLS_COLUMNS as COLUMNS

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
BCREATE_KEYS = (
        Key("vm_ram", "size", 512 << 20, help="RAM (k/m/g/t suffix; default 512m)"),
        Key("vm_cpus", "int", 1, help="virtual CPUs", lo=1, hi=MAX_CPUS),
        Key("vm_os_type", "enum", "linux", help="guest OS family",
            choices=OS_TYPES),
        Key("imgsize", "size", None, help="size of a new empty first disk (default 10g), "
            "or grow an imported one to it"),
        Key("image", "path", None, help="import this disk image (any format qemu-img reads)"),
        Key("iso", "path", None, help="attach this CD-ROM image"),
        Key("kernel", "path", None, help="boot this Linux kernel directly"),
        Key("initrd", "path", None, help="initial ramdisk for kernel="),
        Key("cmdline", "str", None, help="kernel command line for kernel="),
        Key("vnc", "bool", False, help="VNC console on 127.0.0.1"),
        Key("vnc_password", "str", None, help="VNC password (needs vnc=1)"),
        Key("nic", "enum", "user", help="network: user (QEMU's NAT, hostfwd), bridge (a tap "
            "on interface=, or on cbsd's own network cbsd0), none",
            choices=NICS),
        Key("interface", "ifname", None, help="nic=bridge: the Linux bridge (default: cbsd0, "
            "which cbsd sets up with DHCP, DNS and NAT)"),
        Key("nic_hwaddr", "mac", None, help="the NIC's MAC address (default: a random "
            "52:54:00:xx:xx:xx)"),
        Key("hostfwd", "hostfwd", [], help="forward host ports: "
            "tcp:[BIND:]HOSTPORT:GUESTPORT,... (BIND defaults to 127.0.0.1)"),
        Key("astart", "bool", False, help="start at host boot (cbsd-guests unit)"),
        Key("runasap", "bool", False, help="start right after creating"),
        Key("vm_efi", "enum", "none", help="firmware: uefi (OVMF, a per-VM variable "
            "store) or none (BIOS)", choices=EFI_MODES),
        Key("virtio_rnd", "bool", True, help="a virtio-rng device fed from the host's "
            "/dev/urandom"),
        Key("vm_ramfile", "enum", "auto", help="auto: guest RAM in a file where the workdir "
            "can clone files (XFS reflink, btrfs): checkpoints and restores then cost "
            "metadata, not RAM size; off: never", choices=AUTO_OFF),
        Key("vm_dedup", "enum", "auto", help="auto: where RAM is not a file, fold checkpoints "
            "into a deduplicating chunk store in the background (N similar checkpoints cost "
            "about one); off: never", choices=AUTO_OFF),
        Key("vm_genid", "enum", "auto", help="auto: QEMU's vmgenid device (from the next "
            "boot); every restore, clone or import of a saved state gives the guest a new "
            "generation ID, so it reseeds its RNG; off: no device from the next boot",
            choices=AUTO_OFF),
        *CLOUD_INIT,
        *SCHEDULE,
)
# bset takes what bcreate sets, except what only makes sense once (disks, boot media, runasap):
# the same keys, without defaults (a key not given is left as it is).
_ONCE = {"imgsize", "image", "iso", "kernel", "initrd", "cmdline", "runasap"}
BSET_KEYS = tuple(dataclasses.replace(k, default=None) for k in (*BCREATE_KEYS, *HA)
                  if k.name not in _ONCE)
PARALLEL = Key("parallel", "int", 4, help="how many VMs to work on at once", lo=1, hi=64)
# bstop's and brestart's way of stopping, one definition for both
NOACPI = Key("noacpi", "bool", False, help="power off at once instead of ACPI")
HARD_TIMEOUT = Key("hard_timeout", "int", 30, help="seconds to wait for the ACPI shutdown",
                   lo=0, hi=86400)

COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command(
        "bcreate", "Define a VM (and create or import its first disk).",
        (
            J_NAME,
            *BCREATE_KEYS,
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
            NOACPI,
            HARD_TIMEOUT,
            Key("checkpoint", "bool", False, help="hibernate instead (as bsuspend: state to "
                "disk, status Suspended; bstart resumes it)"),
            RUNNING_ONLY,
            PARALLEL,
        ),
        "cbsd bstop jname='web*' hard_timeout=60",
    ),
    Command(
        "brestart", "Restart running VMs: bstop, then bstart (the guest boots afresh).",
        (
            J_MASK,
            NOACPI,
            HARD_TIMEOUT,
            PARALLEL,
        ),
        "cbsd brestart jname=vm1 hard_timeout=60",
        details=("Only a VM that is On or Paused is restarted (a paused one comes back "
                 "running); one that is Off\nor hibernated is an error for that VM and is "
                 "left as it is. The VM stays locked from the stop\nto the start: no other "
                 "command acts on it in between."),
    ),
    Command(
        "bls", "List VMs.",
        (
            Key("jname", "mask", None, help="only VMs matching this mask"),
            Key("display", "list", None, help="columns to show, comma-separated",
                choices=COLUMNS),
            Key("header", "bool", True, help="print the header line"),
            Key("format", "enum", "table", help="output format", choices=("table", "json")),
            Key("order", "enum", "jname", help="sort by this column ('-' before it: "
                "descending)", choices=(*COLUMNS, *(f"-{c}" for c in COLUMNS))),
            Key("node", "str", None, help="list the VMs of this node (cbsd node), or of this "
                "host and every node ('*'), with a node column"),
        ),
        "cbsd bls display=jname,status,vnc_port header=0 order=-vm_ram",
        readonly=True,
        details=("A VM whose inventory entry is damaged is not listed: it is named on stderr "
                 "(one line each),\nthe others are listed, and bls exits 1."),
    ),
    Command(
        "bmetrics", "Print every VM's metrics in Prometheus's text format.",
        (),
        "cbsd bmetrics > cbsd.prom.tmp && mv cbsd.prom.tmp /var/lib/node_exporter/cbsd.prom",
        bare="none",
        readonly=True,
        details=("What the service serves at /metrics, without the service's own health: "
                 "for node_exporter's\ntextfile collector on a host without `cbsd serve` "
                 "(docs/metrics.md)."),
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
        "bunregister", "Forget VMs' inventory entries, keeping every file (bregister brings "
        "them back).",
        (J_MASK,),
        "cbsd bunregister jname=vm1",
        details=("The VM must be Off or hibernated. Its disks, checkpoints, hibernation image "
                 "and vm.json stay\nwhere they are; bls no longer lists it, and bcreate of "
                 "the same name is refused while they exist."),
    ),
    Command(
        "bwhereis", "Say where a VM is: 'local' (this host) or the node that has it.",
        (J_NAME,),
        "cbsd bwhereis jname=vm1",
        bare="one",
        readonly=True,
        details=("The nodes (cbsd node) are asked in parallel, each within CBSD_NODE_TIMEOUT "
                 "s, only when the VM\nis not in this host's inventory. Exit 1 if no host "
                 "has it."),
    ),
    Command(
        "bset", "Change the settings of stopped VMs (the keys bcreate takes).",
        (J_MASK, *BSET_KEYS),
        "cbsd bset jname=vm1 vm_ram=2g vm_cpus=2",
        details=("The VM must be Off (the checkpoint_* keys alone may change while it runs). "
                 "Checkpoints taken\nwith other settings stay listed, marked as not restorable "
                 "(bcheckpoint mode=list shows why);\nsetting them back makes them restorable "
                 "again.\nA ci_* key given empty (ci_gw4=) removes it; any "
                 "ci_* change gives cloud-init a new instance\nid, so the guest applies it at "
                 "its next boot."),
    ),
    Command(
        "bget", "Show a VM's settings.",
        (J_NAME, Key("key", "str", None, help="only this setting (its value alone)"),
         Key("format", "enum", "text", help="output format", choices=("text", "json"))),
        "cbsd bget jname=vm1 vm_ram",
        bare="one-then-words",
        readonly=True,
        details="Bare words after the VM name are setting names: cbsd bget vm1 vm_ram vm_cpus",
    ),
    Command(
        "brename", "Rename a stopped VM, with its disks, checkpoints and files.",
        (Key("old", "name", None, required=True, help="the VM's name now"),
         Key("new", "name", None, required=True, help="its new name")),
        "cbsd brename old=vm1 new=web1",
        bare="none",
    ),
    Command(
        "bclone", "Copy a stopped VM (optionally with one checkpoint) into new ones.",
        (Key("old", "name", None, required=True, help="the VM to copy"),
         Key("new", "str", None, required=True, help="the copy's name; with count=N a "
             "pattern where %d is the number 1..N (new=web%d: web1, web2, ...)"),
         Key("checkpoint", "name", None, help="also copy this checkpoint, so the copy can "
             "continue from its instant (bstart jname=NEW checkpoint=NAME)"),
         Key("count", "int", None, help="make N copies at once, named from the new= pattern "
             "(all or nothing)", lo=1, hi=256),
         Key("start", "bool", False, help="start the copies once all are made (together, "
             "from checkpoint= if given)"),
         PARALLEL),
        "cbsd bclone old=vm1 new=web%d count=4 checkpoint=ready start=1",
        bare="none",
        details=("Each copy gets its own MAC address and cloud-init identity; disks are "
                 "copied with reflinks where\nthe filesystem has them. A copy that continues "
                 "from a checkpoint gets a new network card with its\nown MAC (the guest sees "
                 "a new link and asks DHCP again), a new generation ID, and through the\n"
                 "guest agent a new machine-id and SSH host keys (see docs/checkpoints.md)."),
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
                choices=("create", "list", "destroy", "destroyall", "verify", "replicate")),
            Key("name", "name", None, help="checkpoint name (create: default 'checkpoint'; "
                "destroy: required)"),
            Key("poweroff", "bool", False, help="create: power the VM off once the checkpoint "
                "is safely on disk"),
            Key("suspend", "bool", alias_of="poweroff"),
            Key("live", "bool", False, help="create: keep the guest running while its memory "
                "is written"),
            Key("keep", "int", None, help="create: then delete the oldest checkpoints of the VM "
                "so that this many remain", lo=1, hi=100000),
            Key("format", "enum", "text", help="list: output format", choices=("text", "json")),
            Key("node", "name", None, help="replicate: the standby node (default: the VM's "
                "ha_node)"),
        ),
        "cbsd bcheckpoint mode=create jname=vm1 name=after_update",
        details=("A checkpoint holds memory, CPU and device state and the disk contents of one "
                 "instant.\nRestore with: cbsd bstart jname=VM checkpoint=NAME\n"
                 "mode=list shows them as a tree: each under the checkpoint the VM was restored "
                 "from or\ntaken after ('*': the one the running VM descends from).\n"
                 "mode=replicate takes a live checkpoint ha-G and ships what changed to the "
                 "standby cluster node\n(docs/cluster.md \"Replication\")."),
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
        "bexport", "Write a stopped or hibernated VM, with its checkpoints, to one archive.",
        (
            J_NAME,
            Key("out", "str", None, required=True, help="the archive's path (created; not "
                "overwritten), or - for stdout"),
            Key("checkpoints", "str", "all", help="all, none, or the names to include, "
                "comma-separated"),
            Key("suspend", "bool", False, help="hibernate a running VM first (it stays "
                "hibernated)"),
        ),
        "cbsd bexport jname=vm1 out=- | ssh host2 cbsd bimport in=-",
        bare="one",
        details=("The archive is a tar stream whose every member is checksummed "
                 "(docs/many-hosts.md).\nA hibernated VM travels with its image and resumes "
                 "where it was."),
    ),
    Command(
        "bimport", "Register a VM from a bexport archive, verified before anything is kept.",
        (
            Key("in", "str", None, help="the archive's path, or - for stdin"),
            Key("jname", "name", None, help="register it under this name instead"),
            Key("mode", "enum", "import", help="import; stage, commit, abort: the two "
                "phases bmove drives", choices=("import", "stage", "commit", "abort")),
            Key("id", "str", None, help="commit, abort: what mode=stage answered"),
        ),
        "cbsd bimport in=/backup/vm1.cbsd jname=vm1copy",
        bare="none",
    ),
    Command(
        "node", "Add, list or remove the other hosts cbsd drives over SSH.",
        (
            Key("mode", "enum", None, required=True, help="action",
                choices=("add", "list", "remove")),
            Key("name", "name", None, help="the node's name (add, remove)"),
            Key("host", "str", None, help="add: [USER@]ADDRESS to ssh to"),
            Key("port", "int", 22, help="add: its SSH port", lo=1, hi=65535),
            Key("format", "enum", "text", help="list: output format", choices=("text", "json")),
        ),
        "cbsd node mode=add name=host2 host=root@192.0.2.7",
        bare="none",
        details=("Key authentication and the node's host key (known_hosts) are required, as "
                 "ssh checks them;\ncbsd never turns the checks off. Per-VM commands take "
                 "node=N to act there."),
        readonly_modes=("list",),
    ),
    Command(
        "bmove", "Move a VM with its checkpoints to another node (a running one is "
        "hibernated and resumed there).",
        (
            J_NAME,
            Key("node", "name", None, required=True, help="the node to move it to"),
        ),
        "cbsd bmove jname=vm1 node=host2",
        bare="one",
        details=("Verified on arrival; registered on exactly one host at every instant "
                 "(docs/many-hosts.md)."),
    ),
    Command(
        "bmigrate", "Move a running VM to another node while it runs (memory, disks and "
        "checkpoints, no shared storage).",
        (
            J_NAME,
            Key("node", "name", None, help="the node to migrate it to"),
            Key("mode", "enum", "out", help="out; incoming, status: the node's half, which "
                "bmigrate runs there itself", choices=("out", "incoming", "status")),
        ),
        "cbsd bmigrate jname=vm1 node=host2",
        bare="one",
        details=("Its checkpoints go first, while it runs; then QEMU mirrors the disks over "
                 "NBD and migrates\nthe memory, all through ssh; on any failure the VM keeps "
                 "running here, every\ncheckpoint with it (docs/many-hosts.md)."),
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
    Command(
        "bexec", "Run a command in a running VM through its guest agent (no network, no SSH).",
        (
            J_NAME,
            Key("cmd", "str", None, help="the command line, run by the guest's /bin/sh -c "
                "(or the words after the VM name)"),
            Key("timeout", "int", 600, help="seconds to wait for the command to exit",
                lo=1, hi=86400),
        ),
        "cbsd bexec jname=vm1 cmd='uname -a'",
        bare="one-then-words",
        details=("Needs qemu-guest-agent in the guest. The command's stdout and stderr pass "
                 "through and its exit\ncode is cbsd's; cbsd's own failures print one line "
                 "starting 'cbsd:' (docs/management.md)."),
        readonly=True,
    ),
    Command(
        "bscp", "Copy a file into or out of a running VM through its guest agent.",
        (),
        "cbsd bscp ./install.sh vm1:/root/install.sh",
        bare="words",
        details=("usage: cbsd bscp SRC DST, one of them VM:/PATH. Overwrites DST, as scp does; "
                 "needs\nqemu-guest-agent in the guest (docs/management.md)."),
        readonly=True,
    ),
    *DEVICE_COMMANDS,
    *SERVICE_COMMANDS,
    *SCHEDULE_COMMANDS,
    *CLUSTER_COMMANDS,
)}

# Every command on VMs of this host can act on a node's instead (cli/main.py forwards it).
REMOTE = Key("node", "name", None, help="run this command on that node (cbsd node) over ssh")
LOCAL_ONLY = {"bls", "bmetrics", "node", "bcluster", "bmove", "bmigrate", "bimport",
              "bregister", "bwhereis", "bexec", "bscp", "serve", "token"}
for _name, _cmd in list(COMMANDS.items()):
    if _name not in LOCAL_ONLY and _cmd.key("node") is None:
        COMMANDS[_name] = dataclasses.replace(_cmd, keys=(*_cmd.keys, REMOTE))
