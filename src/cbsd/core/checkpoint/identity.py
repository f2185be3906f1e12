"""A fork of a guest's state is a new machine: on the network (its NIC gets the definition's
MACs) and to its peers (a clone's guest gets a new machine-id and SSH host keys).

QEMU restores virtio-net's (and e1000's) state with the stream, the MAC included, and the
guest's driver read the MAC when it probed the device: a clone continuing from a copied
checkpoint would show the original's MAC until it reboots, and the two would fight over one
address on a bridge. No QMP command changes a realized NIC's MAC, and the guest would not
look again if one did. So the NIC is replaced, as a user would replace a card: hot-unplugged
and a new one hot-plugged with the definition's MAC at the same PCI slot (the guest sees the
old link go and a new one come, and asks DHCP again). Measured on QEMU 7.2 and 10 alike
(i440fx, ACPI PCI hotplug, which Linux has built in as acpiphp).

Order, so that the old MAC never reaches the network: while the guest is still paused after
the load, the link is set down (set_link on the netdev: the NIC drops what the guest sends)
and the unplug is requested; then the guest runs and ejects the card (the ACPI request waits
for it); then the new card is added and the link set up. The replacement has the same model,
properties and slot as the card on the command line, so a later checkpoint of the VM loads
into a freshly started QEMU as every other does.

The rule (load.py): every restore that forks state (a new generation, core/checkpoint/
generation.py) renews each NIC whose definition's MAC differs from the MAC the saved state
holds for that NIC (the manifest's definition, which bclone leaves the original's: its `nics`,
or an older manifest's single-NIC keys read as NIC 1), each at its own PCI slot and netdev
(argv.nic_id, netdev_id). A guest that has not switched ACPI on (acpi_enabled: a firmware-only
or boot-sector guest, a kernel booted with acpi=off) never sees the hotplug request, so the
cards are not unplugged at all and the command says at once that it keeps the saved MACs; a
guest with ACPI that does not eject a card within NIC_WAIT (no acpiphp, or a hung guest) keeps
that card's saved MAC too: its link is set up again and the command says so on stderr
(docs/checkpoints.md).

machine-id and SSH host keys live in the guest's files (and memory), so only the guest can
change them. A state copied by bclone is marked (the manifest's migration[CLONE_OF]: the
original's name); every restore of such a state runs RENEW_SCRIPT in the guest through the
guest agent, in the detached helper that also sets the clock (qemu/agent.py), once the agent
answers. The same script runs at a clone's first boot from cloud-init (core/manage/
cloudinit.py). A guest with neither keeps both (docs/checkpoints.md says what to do).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from cbsd import cancel, debug, specs
from cbsd.core.vm.machine import VM
from cbsd.errors import QemuError
from cbsd.qemu.argv import netdev_id, nic_id, nic_properties
from cbsd.qemu.qmp import Monitor
from cbsd.storage import ckpstore

CLONE_OF = "clone_of"  # the manifest's migration[CLONE_OF]: the VM a copied state came from

# Run by /bin/sh in the guest: a new machine-id (systemd-machine-id-setup; it would reuse a
# VM's SMBIOS UUID, and a random one is written if that gave the old ID back) and new SSH
# host keys (every type ssh-keygen -A makes), then sshd reloaded to serve them. Services that
# read the machine-id when they started (journald, dbus) keep the old one in memory until
# they restart or the guest reboots.
RENEW_SCRIPT = """\
old=$(cat /etc/machine-id 2>/dev/null)
rm -f /etc/machine-id
systemd-machine-id-setup >/dev/null 2>&1
new=$(cat /etc/machine-id 2>/dev/null)
if [ -z "$new" ] || [ "$new" = "$old" ]; then
  tr -d '-' < /proc/sys/kernel/random/uuid > /etc/machine-id
fi
if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then
  cp /etc/machine-id /var/lib/dbus/machine-id
fi
if command -v ssh-keygen >/dev/null; then
  rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
  ssh-keygen -A
  systemctl try-reload-or-restart ssh.service sshd.service 2>/dev/null || true
fi
echo "machine-id $(cat /etc/machine-id)"
"""

NIC_WAIT = 60.0  # seconds a restored guest has to eject its old cards (it may be busy at first)


def saved_macs(m: ckpstore.Manifest) -> list[str]:
    """The MAC of each NIC the saved state holds, in order ("" for QEMU's default), from the
    manifest's definition: a new one has `nics`, an older one the single-NIC keys (mac, ...),
    read as NIC 1 the way every older definition is (specs.upgrade_nics)."""
    nics = specs.upgrade_nics(dict(m.spec)).get("nics", [])
    return [str(n.get("nic_hwaddr") or "") for n in nics if isinstance(n, dict)]


def nics_to_renew(vm: VM, m: ckpstore.Manifest, *, fork: bool) -> list[int]:
    """The NICs (indexes) this load gives a new card: on a fork, each whose MAC the definition
    sets to another than the one the saved state holds for that NIC. A NIC the manifest does
    not show is not renewed (the types in order already match: load.incompatibility)."""
    if not fork:
        return []
    saved = saved_macs(m)
    return [i for i, nic in enumerate(vm.spec.nics)
            if i < len(saved) and nic.nic_hwaddr
            and saved[i].lower() != nic.nic_hwaddr.lower()]


def _slots(mon: Monitor) -> dict[str, str]:
    """Each card's PCI address (slot.function, as device_add's addr= takes it) by its id."""
    return {str(dev["qdev_id"]): f"{int(dev['slot']):02x}.{int(dev['function'])}"
            for bus in mon.cmd("query-pci") for dev in bus.get("devices", [])
            if dev.get("qdev_id")}


def acpi_enabled(mon: Monitor) -> bool | None:
    """Whether the guest switched the chipset's ACPI on (SCI_EN, bit 0 of the PM1 control
    register of PIIX4's or ICH9's PM device, at its pm_io_base + 4; the firmware leaves it
    off, an ACPI OS sets it). A guest with it off never sees the hotplug event, so it cannot
    eject a card. None where QEMU does not tell (then the caller waits as before)."""
    try:
        dev = str(mon.cmd("qom-get", path="/machine", property="acpi-device"))
        base = int(mon.cmd("qom-get", path=dev, property="pm_io_base"))
        out = str(mon.cmd("human-monitor-command", **{"command-line": f"i /h {base + 4:#x}"}))
        return bool(int(out.rsplit("=", 1)[1].strip(), 16) & 1) if base else None
    except (QemuError, ValueError, IndexError):
        return None


def _keep(vm: VM, i: int, why: str) -> None:
    print(f"{vm.jname}: NIC {i + 1}: {why}: the guest keeps the checkpoint's MAC address "
          "until it reboots", file=sys.stderr)


def unplug(vm: VM, mon: Monitor, nics: list[int]) -> dict[int, str]:
    """Before the guest runs: each of *nics*' link down, the unplug of its card requested.
    -> the slot of each card whose unplug was requested. Not requested (said on stderr, the
    guest keeps that card's saved MAC): for a guest that has not switched ACPI on (it cannot
    eject: acpi_enabled), and for a card QEMU cannot unplug (one on a bus without hotplug,
    such as q35's pcie.0)."""
    if not nics:
        return {}
    if acpi_enabled(mon) is False:
        for i in nics:
            _keep(vm, i, "the guest has not switched ACPI on, so it cannot release its "
                  "network card for a new one")
        return {}
    slots = _slots(mon)
    requested = {}
    for i in nics:
        if nic_id(i) not in slots:
            raise QemuError(f"{vm.jname}: QEMU shows no network card {nic_id(i)} after the "
                            "load")
        mon.cmd("set_link", name=netdev_id(i), up=False)
        try:
            mon.cmd("device_del", id=nic_id(i))
        except QemuError as e:
            mon.cmd("set_link", name=netdev_id(i), up=True)
            _keep(vm, i, f"cannot replace the network card ({e})")
            continue
        requested[i] = slots[nic_id(i)]
    return requested


def plug(vm: VM, mon: Monitor, slots: dict[int, str], seconds: float = NIC_WAIT) -> list[int]:
    """Once the guest runs: wait for it to eject the old cards, add a new one at each's slot
    with the definition's MAC and set its link up. -> the NICs replaced. A card the guest did
    not eject in time keeps the saved MAC (said on stderr), its link up again."""
    deadline = time.monotonic() + seconds
    pause = 0.01
    while any(nic_id(i) in (present := _slots(mon)) for i in slots):
        if time.monotonic() >= deadline:
            for i in [i for i in slots if nic_id(i) in present]:
                mon.cmd("set_link", name=netdev_id(i), up=True)
                _keep(vm, i, f"the guest did not release its network card within "
                      f"{seconds:g} s (no ACPI PCI hotplug?); it loses the card if it "
                      "releases it later")
                del slots[i]
            break
        cancel.check()
        time.sleep(pause)
        pause = min(0.1, pause * 2)
    for i, addr in slots.items():
        nic = vm.spec.nics[i]
        props: dict[str, Any] = nic_properties(vm.spec, i, nic, addr)
        mon.cmd("device_add", **props)
        mon.cmd("set_link", name=netdev_id(i), up=True)
        now = str(mon.cmd("qom-get", path=f"/machine/peripheral/{nic_id(i)}",
                          property="mac"))
        if debug.ON:
            debug.log("nic", f"{vm.jname}: card {i + 1} at {addr} replaced, MAC {now}")
        if now.lower() != nic.nic_hwaddr.lower():
            raise QemuError(f"{vm.jname}: the new network card {i + 1} has MAC {now}, "
                            f"expected {nic.nic_hwaddr}")
    return list(slots)


def guest_script(m: ckpstore.Manifest, *, fork: bool) -> str | None:
    """What to run in the restored guest: RENEW_SCRIPT for a state another VM's guest saved
    (a clone's copy), None otherwise (a VM's own checkpoint is the same machine)."""
    return RENEW_SCRIPT if fork and m.migration.get(CLONE_OF) else None
