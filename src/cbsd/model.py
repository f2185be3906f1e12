"""The VM model: its specification, its status, and which status each action needs.

The status is never stored: it is derived from what is true right now (a live QEMU process and
what it reports, a hibernation image on disk, a lock held by another cbsd command).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from cbsd.errors import StateError

# bls columns (contract section 3), in their default order.
BLS_COLUMNS = ("jname", "jid", "vm_ram", "vm_curmem", "vm_cpus", "pcpu", "vm_os_type", "ip4_addr",
               "status", "vnc_port")

# The values a definition's enumerated settings take: bcreate's keys (cli/table.py) and every
# definition from outside (cbsd/specs.py) check against these same tuples.
OS_TYPES = ("linux", "freebsd", "windows", "other")
NICS = ("user", "bridge", "none")  # bcreate's/bset's nic= (the first NIC, or none)
NIC_TYPES = ("user", "bridge")  # a NIC's nic_type (bhyve-nic; docs/networking.md)
MAX_NICS = 8  # PCI slots are shared with disks and other devices: a bound, not a target
EFI_MODES = ("none", "uefi")
AUTO_OFF = ("auto", "off")  # vm_ramfile, vm_dedup, vm_genid
MAX_CPUS = 255
CONTROLLERS = ("virtio-blk", "ahci", "nvme")  # a disk's dsk_controller (qemu/argv.py)
BOOT_MEDIA = ("kernel", "initrd", "iso")  # kept in the VM's folder as boot-MEDIUM
CLOUD_INIT_KEYS = ("ci_user_add", "ci_user_pubkey", "ci_user_pw_user", "ci_user_pw_root",
                   "ci_jname", "ci_fqdn", "ci_ip4_addr", "ci_gw4", "ci_nameserver_address",
                   "ci_nameserver_search")  # bcreate's ci_* keys (core/manage/cloudinit.py)
DEFAULT_CHECKPOINT_PATTERN = "auto-%Y%m%d-%H%M"  # checkpoint_pattern=: a scheduled one's name
# The scheduled-checkpoint keys: bcreate's and bset's names are the VMSpec fields' own.
SCHEDULE_KEYS = ("checkpoint_schedule", "checkpoint_expiry", "checkpoint_pattern",
                 "checkpoint_live", "checkpoint_stopped")
HA_KEYS = ("ha", "ha_node", "ha_interval")


# A saved state's restore_relevant key that the state decides rather than the VM's settings:
# the load recreates the device exactly as saved (core/checkpoint/generation.py), so it is
# never compared with a VM's restore_relevant().
GENID_KEY = "vmgenid"


def settings_part(relevant: dict[str, Any]) -> dict[str, Any]:
    """A saved state's restore_relevant without what the state decides on its own."""
    return {k: v for k, v in relevant.items() if k != GENID_KEY}


class Status(enum.Enum):
    ON = "On"
    OFF = "Off"
    PAUSED = "Paused"
    SUSPENDED = "Suspended"
    MAINTENANCE = "Maintenance"


class Action(enum.Enum):
    START = "start"
    RESTORE = "start from a checkpoint"
    STOP = "stop"
    PAUSE = "pause"
    RESUME = "resume"
    CHECKPOINT = "checkpoint"
    SUSPEND = "hibernate"
    DISCARD = "discard the hibernation image of"
    LOGIN = "attach to the console of"
    CONFIGURE = "change the settings of"
    RENAME = "rename"
    CLONE = "clone"
    DISKS = "attach or detach disks of"
    EXPORT = "export"
    MIGRATE = "migrate live"
    RESTART = "restart"
    UNREGISTER = "unregister"
    GUEST = "run a command in or copy files to or from"
    NICS = "attach or detach NICs of"
    SNAPSHOT = "snapshot the disks of"
    ROLLBACK = "roll back the disks of"


_RUNNING = {Status.ON, Status.PAUSED}
ALLOWED: dict[Action, set[Status]] = {
    Action.START: {Status.OFF, Status.SUSPENDED},
    Action.RESTORE: {Status.OFF},
    Action.STOP: _RUNNING,
    Action.PAUSE: {Status.ON},
    Action.RESUME: {Status.PAUSED},
    Action.CHECKPOINT: _RUNNING,
    Action.SUSPEND: _RUNNING,
    Action.DISCARD: {Status.SUSPENDED},
    Action.LOGIN: _RUNNING,
    Action.CONFIGURE: {Status.OFF},
    Action.RENAME: {Status.OFF},
    Action.CLONE: {Status.OFF},
    Action.DISKS: {Status.OFF},
    # A hibernation image holds the devices it was saved with, as a running QEMU does.
    Action.NICS: {Status.OFF},
    Action.EXPORT: {Status.OFF, Status.SUSPENDED},
    Action.MIGRATE: _RUNNING,
    # brestart restarts what runs: a stopped VM is not started, a hibernated one not thrown
    # away (docs/management.md).
    Action.RESTART: _RUNNING,
    # An inventory entry goes only when no QEMU runs: bpause's quick lane relies on a live
    # QEMU of a VM name existing only for a VM in the inventory (docs/architecture.md).
    Action.UNREGISTER: {Status.OFF, Status.SUSPENDED},
    # bexec, bscp: the guest agent serves only a guest whose vCPUs run (a paused guest would
    # leave the command waiting for nothing).
    Action.GUEST: {Status.ON},
    # bsnapshot: disk snapshots of a VM in any state; a rollback only of one whose disks no
    # QEMU holds and no saved state is about to load (docs/management.md, bsnapshot).
    Action.SNAPSHOT: {Status.ON, Status.PAUSED, Status.OFF, Status.SUSPENDED},
    Action.ROLLBACK: {Status.OFF},
}

# Messages users know from CBSD come first; the rest say what state blocks what.
_WHY = {
    (Action.START, Status.ON): "already running",
    (Action.START, Status.PAUSED): "already running (paused)",
    (Action.RESTORE, Status.ON): "is running: stop it before restoring a checkpoint",
    (Action.RESTORE, Status.PAUSED): "is running (paused): stop it before restoring a checkpoint",
    (Action.RESTORE, Status.SUSPENDED): (
        "is hibernated: resume it with bstart or drop the image with "
        "'bsuspend mode=discard' before restoring a checkpoint"
    ),
    (Action.CONFIGURE, Status.ON): "is running: stop it first (cbsd bstop), then change it",
    (Action.CONFIGURE, Status.PAUSED): "is running (paused): stop it first (cbsd bstop)",
    (Action.CONFIGURE, Status.SUSPENDED): (
        "is hibernated: resume and stop it (bstart, bstop), or drop the image with "
        "'bsuspend mode=discard', before changing it"
    ),
    (Action.EXPORT, Status.ON): ("is running: stop it, or let the export hibernate it first "
                                 "(suspend=1)"),
    (Action.EXPORT, Status.PAUSED): ("is running (paused): stop it, or let the export "
                                     "hibernate it first (suspend=1)"),
    (Action.GUEST, Status.OFF): "not running (start it with 'cbsd bstart')",
    (Action.GUEST, Status.PAUSED): "is paused: its guest agent cannot answer (resume it with "
                                   "'cbsd bpause mode=off')",
    (Action.RESTART, Status.OFF): "not running: nothing to restart ('bstart' starts it)",
    (Action.RESTART, Status.SUSPENDED): (
        "is hibernated: a restart would throw its saved state away; 'bstart' resumes it"
    ),
    (Action.UNREGISTER, Status.ON): "is running: stop it first (cbsd bstop), then unregister it",
    (Action.UNREGISTER, Status.PAUSED): (
        "is running (paused): stop it first (cbsd bstop), then unregister it"
    ),
    (Action.ROLLBACK, Status.ON): ("is running: stop it first (cbsd bstop), then roll its "
                                   "disks back"),
    (Action.ROLLBACK, Status.PAUSED): ("is running (paused): stop it first (cbsd bstop), then "
                                       "roll its disks back"),
    (Action.ROLLBACK, Status.SUSPENDED): (
        "is hibernated: its saved memory expects the disks as they are; resume and stop it "
        "(bstart, bstop), or drop the image with 'bsuspend mode=discard', before a rollback"
    ),
    (Action.STOP, Status.SUSPENDED): (
        "is hibernated: 'bstop' would throw its saved state away; "
        "use 'bsuspend mode=discard' to drop it, or 'bstart' to resume it"
    ),
}


def require(jname: str, status: Status, action: Action) -> None:
    """Raise StateError unless *action* may run on a VM in *status*."""
    if status in ALLOWED[action]:
        return
    why = _WHY.get((action, status))
    if why is None:
        why = f"is {status.value}: cannot {action.value} it"
    raise StateError(f"{jname}: {why}")


@dataclasses.dataclass
class Nic:
    """One network card, with CBSD's bhyvenic column names (docs/networking.md maps them).
    Stored in definitions as {"nic_type": ..., "nic_hwaddr": ..., ...}."""

    nic_type: str = "user"  # user: QEMU's NAT; bridge: a tap on nic_parent
    nic_hwaddr: str = ""  # "": QEMU's default MAC (a VM defined before nic_hwaddr existed)
    nic_parent: str = ""  # bridge: the Linux bridge ("": cbsd's managed network cbsd0)
    hostfwd: list[str] = dataclasses.field(default_factory=list)  # user: "tcp:BIND:HOST:GUEST"


def _one_user_nic() -> list[Nic]:
    return [Nic()]


@dataclasses.dataclass
class VMSpec:
    """Everything needed to run a VM; stored in the inventory and in each checkpoint."""

    jname: str
    ram: int  # bytes
    cpus: int = 1
    os_type: str = "linux"
    machine: str = "pc"  # resolved to a versioned type (pc-i440fx-X.Y) at bcreate
    disks: list[str] = dataclasses.field(default_factory=list)  # file names under vm/<jname>/
    iso: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    vnc: bool = False
    vnc_password: str | None = None
    vnc_bind: str = "127.0.0.1"
    # The NICs in PCI order (the guest's eth0, eth1, ...). A definition written before
    # there could be several (nic, mac, interface, hostfwd) is read as one NIC
    # (specs.from_untrusted), and one with none of those keys had QEMU's user NIC.
    nics: list[Nic] = dataclasses.field(default_factory=_one_user_nic)
    astart: bool = False
    # Defaults below are what a VM defined before the setting existed had (so its saved
    # states stay restorable); bcreate gives new VMs the current defaults.
    guest_agent: bool = False  # virtio-serial channel org.qemu.guest_agent.0
    virtio_rnd: bool = False  # virtio-rng fed from the host's /dev/urandom
    efi: str = "none"  # "uefi": OVMF with a per-VM variable store
    cloud_init: dict[str, str] = dataclasses.field(default_factory=dict)  # ci_* keys
    # Disk file name -> controller (virtio-blk, ahci, nvme) where it is not the OS default.
    disk_controllers: dict[str, str] = dataclasses.field(default_factory=dict)
    # "auto": guest RAM lives in a file where the workdir's filesystem can clone files (XFS
    # reflink, btrfs), so checkpoints and restores cost metadata, not RAM size; "off": never.
    # Not restore-relevant: states saved either way load into both.
    ram_file: str = "auto"
    # "auto": where RAM is not a file, checkpoints' streams are folded into the VM's chunk
    # store once published (core/checkpoint/fold.py), so checkpoints share what they
    # repeat; "off": never.
    dedup: str = "auto"
    # "auto": QEMU's vmgenid device at every boot, and a new generation ID for every fork of
    # a saved state (core/checkpoint/generation.py); "off": no device at the next boot. A
    # VM defined before the setting existed gets it at its next boot, never in a running
    # QEMU: whether a saved state has the device is the state's (restore_relevant "vmgenid").
    genid: str = "auto"
    # Scheduled checkpoints (core/manage/schedule.py, docs/checkpoints.md "Schedules"): a cron
    # expression or @hourly/@daily/... ("" = none), how long each one is kept ("" = forever:
    # e.g. "2d"), their names (strftime fields of the time taken), live=1 for a running VM,
    # and whether a stopped VM gets them too. Not restore-relevant.
    checkpoint_schedule: str = ""
    checkpoint_expiry: str = ""
    checkpoint_pattern: str = DEFAULT_CHECKPOINT_PATTERN
    checkpoint_live: bool = False
    checkpoint_stopped: bool = False
    # Replication to a standby cluster node (core/cluster/replica.py, docs/cluster.md
    # "Replication"): on, the standby's node name, the interval ("30s", "5m"). Not
    # restore-relevant; bset may change them while the VM runs.
    ha: bool = False
    ha_node: str = ""
    ha_interval: str = "30s"

    # bcreate's and bset's single-NIC keys read the first NIC (bget shows them so).
    @property
    def nic(self) -> str:
        return self.nics[0].nic_type if self.nics else "none"

    @property
    def mac(self) -> str:
        return self.nics[0].nic_hwaddr if self.nics else ""

    @property
    def interface(self) -> str:
        return self.nics[0].nic_parent if self.nics else ""

    @property
    def hostfwd(self) -> list[str]:
        return list(self.nics[0].hostfwd) if self.nics else []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMSpec:
        """No checks: only for what this cbsd process itself just wrote. A definition read
        from anywhere (an archive, a node, vm.json, the inventory) goes through
        specs.from_untrusted, which checks every key and value as bcreate does."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in d.items() if k in known}
        if "nics" in fields:
            fields["nics"] = [Nic(**n) for n in fields["nics"]]
        return cls(**fields)

    def seed_attached(self, seed_path: str) -> bool:
        return bool(self.cloud_init and seed_path)

    def restore_relevant(self) -> dict[str, Any]:
        """The parts of the spec a saved state depends on (QEMU refuses to load otherwise).
        Devices added after the first release appear only when present, so a state saved
        before they existed compares equal to a VM that does not have them."""
        relevant: dict[str, Any] = {
            "ram": self.ram,
            "cpus": self.cpus,
            "machine": self.machine,
            "disks": list(self.disks),
            "iso": self.iso is not None,
            "kernel": self.kernel is not None,
            "vnc": self.vnc,
            # The NICs' types in order: user NICs carry QEMU state of their own (slirp), and
            # each NIC is a PCI device of the stream. One NIC reads as before ("user").
            "nic": ",".join(n.nic_type for n in self.nics) or "none",
        }
        later = {"guest_agent": self.guest_agent, "virtio_rnd": self.virtio_rnd,
                 "efi": self.efi if self.efi != "none" else None,
                 "seed": bool(self.cloud_init),
                 "disk_controllers": dict(self.disk_controllers)}
        relevant.update({k: v for k, v in later.items() if v})
        return relevant
